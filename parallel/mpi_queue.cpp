// The communication thread: executes one communicator's host operations in issue order.
//
// Why a thread: Open MPI progresses a non-blocking collective only inside MPI calls, so an
// MPI_Iallreduce issued before a long backward pass mostly runs when it is finally waited on, and
// nothing is hidden. A thread that sits in the blocking MPI call keeps the transfer and the reduction
// moving while the caller computes (MPI_THREAD_MULTIPLE; each communicator owns its MPI_Comm, so
// threads of different communicators never share one). Point-to-point requests are posted
// non-blocking and polled, with a short nap between polls, so a receive that waits for its sender
// never holds up the operations queued behind it.
#include "parallel/communicator_impl.h"

#if KRAKEN_WITH_MPI

#include <exception>

namespace kraken::parallel::detail {
namespace {
// How long the thread naps between polls of in-flight point-to-point requests when nothing new is
// queued: short against a pipeline stage's compute, long enough not to spin a shared core.
constexpr auto kPollInterval = std::chrono::microseconds(50);
}  // namespace

void HostOp::complete(std::exception_ptr error) {
  const double ran = seconds_between(started, Clock::now());
  // Drop the closures (and the tensors they hold) now: the caller keeps its own references.
  run = nullptr;
  post = nullptr;
  after = nullptr;
  if (stats) stats->add_done(ran, error ? 0 : bytes);
  {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = error;
    seconds_ = ran;
    finished_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

void HostOp::wait() {
  if (!finished_.load(std::memory_order_acquire)) {
    const Clock::time_point begin = Clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return finished_.load(std::memory_order_acquire); });
    lock.unlock();
    if (stats) stats->add_wait(seconds_between(begin, Clock::now()));
  }
  if (error_) std::rethrow_exception(error_);
}

struct MpiQueue::Shared {
  MPI_Comm comm = MPI_COMM_NULL;
  std::string name;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<HostOp>> queue;
  int64_t unfinished = 0;  // submitted and not yet complete (queued or in flight)
  bool stop = false;
  bool started = false;
  std::thread thread;
};

MpiQueue::MpiQueue(MPI_Comm owned, std::string name) : shared_(std::make_shared<Shared>()) {
  shared_->comm = owned;
  shared_->name = std::move(name);
  // Errors come back to KRAKEN_MPI_CHECK (file and line) instead of aborting inside MPI.
  KRAKEN_MPI_CHECK(MPI_Comm_set_errhandler(owned, MPI_ERRORS_RETURN));
}

MpiQueue::~MpiQueue() {
  std::shared_ptr<Shared> s = shared_;
  bool abandon = false;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    s->stop = true;
    // Unwinding with operations still in flight (another rank failed, or this one threw between a
    // start and its wait): joining could wait forever for peers that will never come, and the error
    // must reach run_guarded, which aborts the job. The thread keeps its own reference to the state.
    abandon = s->unfinished > 0 && std::uncaught_exceptions() > 0;
  }
  s->cv.notify_all();
  if (s->thread.joinable()) {
    if (abandon) {
      s->thread.detach();
      return;
    }
    s->thread.join();  // drains what was queued
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&s->comm);  // no check: a destructor must not throw
}

Handle MpiQueue::submit(std::shared_ptr<HostOp> op) {
  std::shared_ptr<Shared> s = shared_;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    KRAKEN_CHECK(!s->stop, "operation ", op->what, " submitted to communicator ", s->name, " while it shuts down");
    if (!s->started) {
      s->thread = std::thread(&MpiQueue::loop, s);
      s->started = true;
    }
    s->queue.push_back(op);
    s->unfinished += 1;
  }
  s->cv.notify_one();
  return Handle(op);
}

namespace {

// Runs or posts one operation; true when it completed right away (collectives).
bool execute(MPI_Comm comm, HostOp& op) {
  op.started = Clock::now();
  try {
    if (op.run) {
      op.run(comm);
      if (op.after) op.after();
      op.complete(nullptr);
      return true;
    }
    op.post(comm, &op.requests, &op.expected_bytes);
    KRAKEN_CHECK(op.requests.size() == op.expected_bytes.size());
    return false;
  } catch (...) {
    op.complete(std::current_exception());
    return true;
  }
}

// Tests a posted point-to-point operation; true when it is complete (successfully or not).
bool test(HostOp& op) {
  try {
    int flag = 0;
    std::vector<MPI_Status> statuses(op.requests.size());
    KRAKEN_MPI_CHECK(MPI_Testall(static_cast<int>(op.requests.size()), op.requests.data(), &flag, statuses.data()));
    if (!flag) return false;
    for (size_t i = 0; i < statuses.size(); ++i) {
      if (op.expected_bytes[i] < 0) continue;
      int count = 0;
      KRAKEN_MPI_CHECK(MPI_Get_count(&statuses[i], MPI_BYTE, &count));
      if (count != op.expected_bytes[i])
        KRAKEN_THROW(op.what, ": received ", count, " bytes from rank ", statuses[i].MPI_SOURCE, " (tag ",
                     statuses[i].MPI_TAG, "), expected ", op.expected_bytes[i],
                     " (sender and receiver disagree on the tensor's shape or dtype)");
    }
    if (op.after) op.after();
    op.complete(nullptr);
  } catch (...) {
    op.complete(std::current_exception());
  }
  return true;
}

}  // namespace

void MpiQueue::loop(std::shared_ptr<Shared> s) {
  std::vector<std::shared_ptr<HostOp>> in_flight;  // posted point-to-point operations
  std::unique_lock<std::mutex> lock(s->mu);
  for (;;) {
    if (!s->queue.empty()) {
      std::shared_ptr<HostOp> op = s->queue.front();
      s->queue.pop_front();
      lock.unlock();
      const bool finished = execute(s->comm, *op);
      if (!finished) in_flight.push_back(op);
      lock.lock();
      if (finished) s->unfinished -= 1;
      continue;
    }
    if (in_flight.empty()) {
      if (s->stop) return;
      s->cv.wait(lock, [&] { return s->stop || !s->queue.empty(); });
      continue;
    }
    lock.unlock();
    int64_t completed = 0;
    for (auto it = in_flight.begin(); it != in_flight.end();) {
      if (test(**it)) {
        it = in_flight.erase(it);
        completed += 1;
      } else {
        ++it;
      }
    }
    lock.lock();
    s->unfinished -= completed;
    if (completed == 0 && s->queue.empty()) s->cv.wait_for(lock, kPollInterval);
  }
}

}  // namespace kraken::parallel::detail

#endif  // KRAKEN_WITH_MPI
