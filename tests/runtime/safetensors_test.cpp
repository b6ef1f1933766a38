// safetensors: round trips, the writer's bytes against the format description, atomic replacement,
// and one rejection test per kind of corrupt file, each checking that the message names the problem.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>

#include "runtime/safetensors.h"
#include "tests/support/errors.h"

namespace kraken::runtime {
namespace {

namespace fs = std::filesystem;

using ::kraken::testing::message_of;

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "missing '" << (needle) << "' in: " << (haystack)

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out;
}

// A file from a header text (used as given, no padding added) and raw data bytes.
std::string file_bytes(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

// Every test gets its own directory, so tests may run in parallel processes.
class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (fs::temp_directory_path() / "kraken_safetensors_XXXXXX").string();
    ASSERT_NE(mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // What SafetensorsFile::open says about a file with these bytes.
  std::string open_error(const std::string& bytes) {
    const std::string p = path("bad.safetensors");
    write_bytes(p, bytes);
    return message_of([&] { SafetensorsFile::open(p); });
  }

  // A valid file written by save_safetensors, whose header is exactly
  // {"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"I32","shape":[3],"data_offsets":[16,28]}}
  // (112 bytes, already a multiple of 8), followed by 28 data bytes. Corruption tests edit it.
  std::string valid_file() {
    const std::string p = path("valid.safetensors");
    save_safetensors(p, {{"a", Tensor::from_vector({1, 2, 3, 4}, {2, 2})}, {"b", Tensor::from_ints({5, 6, 7}, {3})}});
    std::string bytes = read_bytes(p);
    EXPECT_EQ(bytes.size(), 8u + 112 + 28);
    return bytes;
  }

  // Replaces `from` by `to` in the header of `bytes`, re-padding and rewriting the length as needed.
  static std::string edit_header(const std::string& bytes, const std::string& from, const std::string& to) {
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    std::string header = bytes.substr(8, n);
    const size_t at = header.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    header.replace(at, from.size(), to);
    header.append((8 - header.size() % 8) % 8, ' ');
    return file_bytes(header, bytes.substr(8 + n));
  }

  std::string dir_;
};

// ---- round trips ---------------------------------------------------------------------------------

TEST_F(Safetensors, RoundTripsEveryDtypeBitExactly) {
  // Special values travel as bits: NaN payload, -0, infinities, a denormal.
  const float nan_bits = [] {
    uint32_t bits = 0x7fc01234u;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }();
  Tensor f32 = Tensor::from_vector({1.5f, -0.0f, std::numeric_limits<float>::infinity(), -1e-45f, nan_bits, 3.25e7f},
                                   {2, 3});
  Tensor bf16 = Tensor::empty({2, 2}, DType::BF16);
  const uint16_t bf16_bits[] = {0x3f80, 0xc000, 0x7fc1, 0x0001};  // 1, -2, a NaN, the smallest denormal
  std::memcpy(bf16.data<uint16_t>(), bf16_bits, sizeof bf16_bits);
  Tensor i32 = Tensor::from_ints({std::numeric_limits<int32_t>::min(), -1, 0, std::numeric_limits<int32_t>::max()}, {4});
  Tensor u16 = Tensor::empty({1, 3, 1}, DType::U16);
  const uint16_t u16_values[] = {0, 50256, 65535};
  std::memcpy(u16.data<uint16_t>(), u16_values, sizeof u16_values);

  const std::string p = path("all.safetensors");
  save_safetensors(p, {{"f32", f32}, {"bf16", bf16}, {"i32", i32}, {"u16", u16}});
  const SafetensorsFile file = SafetensorsFile::open(p);
  EXPECT_EQ(file.names(), (std::vector<std::string>{"f32", "bf16", "i32", "u16"}));
  EXPECT_TRUE(file.contains("bf16"));
  EXPECT_FALSE(file.contains("f64"));
  // Ranges follow the given order without gaps: 24, 8, 16 and 6 bytes.
  EXPECT_EQ(file.entry("f32").begin, 0u);
  EXPECT_EQ(file.entry("bf16").begin, 24u);
  EXPECT_EQ(file.entry("i32").begin, 32u);
  EXPECT_EQ(file.entry("u16").begin, 48u);
  EXPECT_EQ(file.entry("u16").end, 54u);
  EXPECT_EQ(file.entry("u16").shape, (Shape{1, 3, 1}));
  EXPECT_EQ(file.data_offset() % 8, 0u);

  for (const Tensor& original : {f32, bf16, i32, u16}) {
    const std::string name = dtype_name(original.dtype());
    const Tensor back = file.load(name);
    EXPECT_EQ(back.dtype(), original.dtype()) << name;
    EXPECT_EQ(back.shape(), original.shape()) << name;
    EXPECT_EQ(file.entry(name).dtype, original.dtype()) << name;
    ASSERT_EQ(back.nbytes(), original.nbytes()) << name;
    EXPECT_EQ(std::memcmp(back.data_ptr(), original.data_ptr(), back.nbytes()), 0) << name;
  }
}

TEST_F(Safetensors, RoundTripsScalarsEmptyTensorsAndMetadata) {
  const std::string p = path("edge.safetensors");
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"step", "1200"}, {"note", "naïve \"quoted\"\n"}};
  save_safetensors(p,
                   {{"scalar", Tensor::from_vector({2.5f}, {})},
                    {"empty", Tensor::empty({0}, DType::I32)},
                    {"empty_middle", Tensor::empty({3, 0, 2})},
                    {"after", Tensor::from_ints({9}, {1})}},
                   metadata);
  const auto loaded = load_safetensors(p);
  ASSERT_EQ(loaded.size(), 4u);
  EXPECT_EQ(loaded[0].first, "scalar");
  EXPECT_EQ(loaded[0].second.shape(), Shape{});
  EXPECT_EQ(loaded[0].second.item(), 2.5f);
  EXPECT_EQ(loaded[1].second.shape(), Shape{0});
  EXPECT_EQ(loaded[1].second.dtype(), DType::I32);
  EXPECT_EQ(loaded[2].second.shape(), (Shape{3, 0, 2}));
  EXPECT_EQ(loaded[3].second.to_int_vector(), std::vector<int32_t>{9});
  const SafetensorsFile file = SafetensorsFile::open(p);
  EXPECT_EQ(file.metadata(), metadata);
  // Empty tensors occupy zero-length ranges at their place in the order.
  EXPECT_EQ(file.entry("empty").begin, 4u);
  EXPECT_EQ(file.entry("empty").end, 4u);
  EXPECT_EQ(file.entry("after").begin, 4u);
}

TEST_F(Safetensors, EmptyFileWithNoTensorsRoundTrips) {
  const std::string p = path("none.safetensors");
  save_safetensors(p, {});
  // "{}" padded to 8 bytes, no data.
  EXPECT_EQ(read_bytes(p), le64(8) + "{}      ");
  EXPECT_TRUE(load_safetensors(p).empty());
}

TEST_F(Safetensors, SavesViewsAtTheirOffset) {
  Tensor whole = Tensor::from_vector({0, 1, 2, 3, 4, 5}, {3, 2});
  const std::string p = path("view.safetensors");
  save_safetensors(p, {{"rows", whole.slice(1, 3)}});
  EXPECT_EQ(SafetensorsFile::open(p).load("rows").to_vector(), (std::vector<float>{2, 3, 4, 5}));
}

// ---- the writer against the format description ---------------------------------------------------------

TEST_F(Safetensors, WriterBytesMatchTheFormatByHand) {
  // Built from the format alone: 8-byte little-endian header length; the JSON header with
  // __metadata__ first, then the tensors in the given order with keys dtype, shape, data_offsets; the
  // header (141 bytes of JSON) padded with 3 spaces to 144 = 0x90 so that the data starts at 152, a
  // multiple of 8; then the data: f32 1.0 = 0x3f800000 and -2.0 = 0xc0000000, u16 1, 258, 65535, all
  // little-endian.
  std::string expected("\x90\x00\x00\x00\x00\x00\x00\x00", 8);
  expected +=
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"ids\":{\"dtype\":\"U16\",\"shape\":[3],\"data_offsets\":[8,14]}}   ";
  expected += std::string("\x00\x00\x80\x3f\x00\x00\x00\xc0", 8);
  expected += std::string("\x01\x00\x02\x01\xff\xff", 6);
  ASSERT_EQ(expected.size(), 8u + 144 + 14);

  Tensor ids = Tensor::empty({3}, DType::U16);
  const uint16_t values[] = {1, 258, 65535};
  std::memcpy(ids.data<uint16_t>(), values, sizeof values);
  const std::string p = path("tiny.safetensors");
  save_safetensors(p, {{"w", Tensor::from_vector({1.0f, -2.0f}, {2})}, {"ids", ids}}, {{"format", "pt"}});
  const std::string written = read_bytes(p);
  EXPECT_EQ(written, expected);
  if (written != expected) {
    for (size_t i = 0; i < std::min(written.size(), expected.size()); ++i)
      if (written[i] != expected[i]) {
        ADD_FAILURE() << "first difference at byte " << i;
        break;
      }
  }
}

TEST_F(Safetensors, ReadsForeignLayoutWithWhitespaceAndOutOfOrderData) {
  // As another writer might lay it out: spaces and newlines in the JSON, keys in another order, the
  // header's second tensor first in the data, a header length that is not a multiple of 8.
  const std::string header =
      "{ \"b\" : {\"data_offsets\": [0, 4], \"shape\": [], \"dtype\": \"I32\"},\n"
      "  \"a\" : {\"shape\": [1, 2], \"dtype\": \"BF16\", \"data_offsets\": [4, 8]},\n"
      "  \"__metadata__\": {\"k\": \"v\"} }  ";
  const std::string data("\x07\x00\x00\x00\x80\x3f\x00\xc0", 8);  // i32 7; bf16 1.0, -2.0
  const std::string p = path("foreign.safetensors");
  write_bytes(p, file_bytes(header, data));
  const SafetensorsFile file = SafetensorsFile::open(p);
  EXPECT_EQ(file.names(), (std::vector<std::string>{"b", "a"}));
  EXPECT_EQ(file.metadata().at("k"), "v");
  EXPECT_EQ(file.load("b").to_int_vector(), std::vector<int32_t>{7});
  EXPECT_EQ(file.load("a").to_vector(), (std::vector<float>{1.0f, -2.0f}));
}

// ---- atomic writes and write errors -----------------------------------------------------------------

TEST_F(Safetensors, SaveReplacesAnExistingFileAndLeavesNoTmp) {
  const std::string p = path("model.safetensors");
  write_bytes(p, "an old file that is not safetensors at all");
  save_safetensors(p, {{"x", Tensor::from_vector({4, 5}, {2})}});
  EXPECT_EQ(SafetensorsFile::open(p).load("x").to_vector(), (std::vector<float>{4, 5}));
  save_safetensors(p, {{"y", Tensor::from_vector({6}, {1})}});
  EXPECT_EQ(SafetensorsFile::open(p).names(), std::vector<std::string>{"y"});
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir_)) files.push_back(e.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"model.safetensors"});
}

TEST_F(Safetensors, SaveIntoMissingDirectoryNamesPathAndErrno) {
  const std::string p = path("no/such/dir/model.safetensors");
  const std::string msg = message_of([&] { save_safetensors(p, {{"x", Tensor::zeros({2})}}); });
  EXPECT_HAS(msg, p);
  EXPECT_HAS(msg, std::strerror(ENOENT));
}

TEST_F(Safetensors, FailedWriteKeepsTheOldFileAndRemovesTmp) {
  // A file-size limit makes write() fail with EFBIG part-way through, as a full disk would with ENOSPC.
  const std::string p = path("model.safetensors");
  write_bytes(p, "previous checkpoint");
  struct rlimit saved {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  struct rlimit small = saved;
  small.rlim_cur = 64 * 1024;
  void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::string msg = message_of([&] { save_safetensors(p, {{"big", Tensor::zeros({1 << 18})}}); });  // 1 MiB
  setrlimit(RLIMIT_FSIZE, &saved);
  signal(SIGXFSZ, old_handler);
  EXPECT_HAS(msg, p);
  EXPECT_HAS(msg, std::strerror(EFBIG));
  EXPECT_EQ(read_bytes(p), "previous checkpoint");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

TEST_F(Safetensors, SaveRejectsDuplicateAndReservedNamesWithoutTouchingTheFile) {
  const std::string p = path("model.safetensors");
  write_bytes(p, "previous");
  const std::string dup = message_of([&] { save_safetensors(p, {{"w", Tensor::zeros({1})}, {"w", Tensor::zeros({2})}}); });
  EXPECT_HAS(dup, "duplicate tensor name 'w'");
  EXPECT_HAS(dup, p);
  const std::string reserved = message_of([&] { save_safetensors(p, {{"__metadata__", Tensor::zeros({1})}}); });
  EXPECT_HAS(reserved, "reserved");
  const std::string undefined = message_of([&] { save_safetensors(p, {{"ghost", Tensor()}}); });
  EXPECT_HAS(undefined, "'ghost' is undefined");
  EXPECT_EQ(read_bytes(p), "previous");
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

// ---- rejection of corrupt files: one test per problem ------------------------------------------------

TEST_F(Safetensors, ValidFileFixtureHasTheExpectedHeader) {
  // The corruption tests below edit this exact text; if the writer's format changes, they must too.
  const std::string bytes = valid_file();
  EXPECT_EQ(bytes.substr(8, 112),
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
            "\"b\":{\"dtype\":\"I32\",\"shape\":[3],\"data_offsets\":[16,28]}}");
}

TEST_F(Safetensors, RejectsFileShorterThanTheLengthField) {
  const std::string msg = open_error(valid_file().substr(0, 5));
  EXPECT_HAS(msg, "bad.safetensors");
  EXPECT_HAS(msg, "is 5 bytes, shorter than the 8-byte header length");
}

TEST_F(Safetensors, RejectsHeaderLengthPastTheEnd) {
  std::string bytes = valid_file();
  bytes.replace(0, 8, le64(bytes.size()));  // claims more header than the whole file
  const std::string msg = open_error(bytes);
  EXPECT_HAS(msg, "header length 148 runs past the end of the file (148 bytes");
}

TEST_F(Safetensors, RejectsAbsurdHeaderLength) {
  std::string bytes = valid_file();
  bytes.replace(0, 8, le64(uint64_t{1} << 62));
  EXPECT_HAS(open_error(bytes), "header length 4611686018427387904 is absurdly large");
}

TEST_F(Safetensors, RejectsTruncatedDataRegion) {
  const std::string bytes = valid_file();
  const std::string msg = open_error(bytes.substr(0, bytes.size() - 4));
  EXPECT_HAS(msg, "tensor 'b'");
  EXPECT_HAS(msg, "run past the end of the data region (24 bytes)");
  EXPECT_HAS(msg, "truncated");
}

TEST_F(Safetensors, RejectsInvalidJson) {
  const std::string msg = open_error(edit_header(valid_file(), "\"dtype\":\"F32\"", "\"dtype\" \"F32\""));
  EXPECT_HAS(msg, "the header is not valid JSON");
}

TEST_F(Safetensors, RejectsHeaderThatIsNotAnObject) {
  EXPECT_HAS(open_error(file_bytes("[1, 2]  ", "")), "the header is a JSON array, expected an object");
}

TEST_F(Safetensors, RejectsEntryThatIsNotAnObject) {
  EXPECT_HAS(open_error(file_bytes("{\"w\": [0, 4]}  ", "")), "entry 'w' is a JSON array, expected an object");
}

TEST_F(Safetensors, RejectsMissingDtype) {
  EXPECT_HAS(open_error(edit_header(valid_file(), "\"dtype\":\"I32\",", "")), "tensor 'b' has no \"dtype\"");
}

TEST_F(Safetensors, RejectsWrongTypedFields) {
  EXPECT_HAS(open_error(edit_header(valid_file(), "\"I32\"", "32")), "tensor 'b': \"dtype\" is a JSON number");
  EXPECT_HAS(open_error(edit_header(valid_file(), "\"shape\":[3]", "\"shape\":\"3\"")),
             "tensor 'b': \"shape\" is a JSON string, expected an array");
  EXPECT_HAS(open_error(edit_header(valid_file(), "[16,28]", "[16,28,40]")),
             "tensor 'b': \"data_offsets\" is [16,28,40], expected [begin, end]");
  EXPECT_HAS(open_error(edit_header(valid_file(), "[16,28]", "[16.0,28]")), "16.0 is not an integer");
  EXPECT_HAS(open_error(edit_header(valid_file(), "[3]", "[\"3\"]")), "dimension \"3\" is a JSON string");
}

TEST_F(Safetensors, RejectsUnknownDtypeNamingItAndTheTensor) {
  const std::string msg = open_error(edit_header(valid_file(), "\"I32\"", "\"F64\""));
  EXPECT_HAS(msg, "tensor 'b' has dtype 'F64', which Kraken does not support");
}

TEST_F(Safetensors, RejectsNegativeDimension) {
  EXPECT_HAS(open_error(edit_header(valid_file(), "[3]", "[-3]")), "tensor 'b': shape [-3]: dimension -3 is negative");
}

TEST_F(Safetensors, RejectsOverflowingShape) {
  // 2^32 · 2^32 elements do not fit in 64 bits; 2^61 f32 elements do, but not their 2^63 bytes.
  EXPECT_HAS(open_error(edit_header(valid_file(), "[3]", "[4294967296,4294967296]")),
             "has more elements than fit in 64 bits");
  EXPECT_HAS(open_error(edit_header(valid_file(), "[2,2]", "[2305843009213693952]")),
             "needs more bytes than fit in 64 bits");
  EXPECT_HAS(open_error(edit_header(valid_file(), "[3]", "[18446744073709551615]")), "is too large");
}

TEST_F(Safetensors, RejectsBeginAfterEnd) {
  EXPECT_HAS(open_error(edit_header(valid_file(), "[16,28]", "[28,16]")),
             "tensor 'b': data_offsets [28, 16] begin after they end");
}

TEST_F(Safetensors, RejectsOffsetsPastTheDataRegion) {
  const std::string msg = open_error(edit_header(valid_file(), "[16,28]", "[20,32]"));
  EXPECT_HAS(msg, "tensor 'b': data_offsets [20, 32] run past the end of the data region (28 bytes)");
}

TEST_F(Safetensors, RejectsSizeMismatch) {
  const std::string msg = open_error(edit_header(valid_file(), "\"shape\":[3]", "\"shape\":[4]"));
  EXPECT_HAS(msg, "tensor 'b': data_offsets [16, 28] hold 12 bytes, but I32 (4,) needs 16 bytes (size mismatch)");
}

TEST_F(Safetensors, RejectsOverlappingRanges) {
  const std::string msg = open_error(edit_header(valid_file(), "[16,28]", "[12,24]"));
  EXPECT_HAS(msg, "tensors 'a' [0, 16) and 'b' [12, 24) overlap");
}

TEST_F(Safetensors, RejectsGapBetweenTensors) {
  // 'a' shrinks to 8 bytes; 'b' still starts at 16, leaving bytes [8, 16) to nobody.
  const std::string bytes = edit_header(valid_file(), "\"shape\":[2,2],\"data_offsets\":[0,16]",
                                        "\"shape\":[2,1],\"data_offsets\":[0,8]");
  const std::string msg = open_error(bytes);
  EXPECT_HAS(msg, "gap in the data region: bytes [8, 16) before tensor 'b' belong to no tensor");
  EXPECT_HAS(msg, "reference implementation");
}

TEST_F(Safetensors, RejectsUncoveredBytesAfterTheLastTensor) {
  const std::string msg = open_error(valid_file() + std::string(4, '\0'));
  EXPECT_HAS(msg, "gap in the data region: its last 4 bytes [28, 32) belong to no tensor");
}

TEST_F(Safetensors, RejectsNonStringMetadata) {
  const std::string header = "{\"__metadata__\":{\"step\":12},\"x\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}";
  const std::string msg = open_error(file_bytes(header, std::string(4, '\0')));
  EXPECT_HAS(msg, "\"__metadata__\" value for 'step' is a JSON number, expected a string");
}

TEST_F(Safetensors, RejectsDuplicateKeys) {
  const std::string entry = "{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}";
  EXPECT_HAS(open_error(file_bytes("{\"x\":" + entry + ",\"x\":" + entry + "}", std::string(4, '\0'))),
             "the header has the key 'x' twice");
  const std::string twice = "{\"x\":{\"dtype\":\"F32\",\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[0,4]}}";
  EXPECT_HAS(open_error(file_bytes(twice, std::string(4, '\0'))), "entry 'x' has the key 'dtype' twice");
}

TEST_F(Safetensors, MissingFileNamesPathAndErrno) {
  const std::string p = path("absent.safetensors");
  const std::string msg = message_of([&] { SafetensorsFile::open(p); });
  EXPECT_HAS(msg, p);
  EXPECT_HAS(msg, std::strerror(ENOENT));
}

// ---- lookups and load_into --------------------------------------------------------------------------

TEST_F(Safetensors, LoadIntoRejectsShapeMismatchNamingBothShapes) {
  const std::string p = path("m.safetensors");
  save_safetensors(p, {{"h.0.attn.weight", Tensor::zeros({2, 3})}});
  const SafetensorsFile file = SafetensorsFile::open(p);
  Tensor wrong_shape = Tensor::zeros({3, 2});
  const std::string msg = message_of([&] { file.load_into("h.0.attn.weight", wrong_shape); });
  EXPECT_HAS(msg, "'h.0.attn.weight'");
  EXPECT_HAS(msg, "f32 (2, 3) in the file, but the destination is f32 (3, 2)");
  EXPECT_HAS(msg, p);
  Tensor wrong_dtype = Tensor::zeros({2, 3}, DType::I32);
  EXPECT_HAS(message_of([&] { file.load_into("h.0.attn.weight", wrong_dtype); }), "the destination is i32 (2, 3)");
}

TEST_F(Safetensors, LoadIntoFillsAViewOfALargerBuffer) {
  // Checkpoint loading may target views into one flat parameter buffer.
  const std::string p = path("m.safetensors");
  save_safetensors(p, {{"w", Tensor::from_vector({7, 8, 9, 10}, {2, 2})}});
  Tensor flat = Tensor::zeros({8});
  Tensor view = flat.slice(2, 6).reshape({2, 2});
  SafetensorsFile::open(p).load_into("w", view);
  EXPECT_EQ(flat.to_vector(), (std::vector<float>{0, 0, 7, 8, 9, 10, 0, 0}));
}

TEST_F(Safetensors, UnknownNameListsWhatTheFileHas) {
  const std::string p = path("m.safetensors");
  save_safetensors(p, {{"wte", Tensor::zeros({2})}, {"wpe", Tensor::zeros({2})}});
  const std::string msg = message_of([&] { SafetensorsFile::open(p).load("lm_head"); });
  EXPECT_HAS(msg, "no tensor named 'lm_head' (the file has 2 tensors: 'wte', 'wpe')");
}

TEST_F(Safetensors, RoundTripsThroughCudaInStagedChunks) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU";
  // 5·2^20 floats = 20 MiB, more than one 16 MiB staging chunk in each direction.
  std::vector<float> values(5 << 20);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 1000003) * 0.5f;
  const std::string p = path("gpu.safetensors");
  save_safetensors(p, {{"w", Tensor::from_vector(values, {5, 1 << 20}, Device::cuda(0))}});
  const SafetensorsFile file = SafetensorsFile::open(p);
  EXPECT_EQ(file.load("w").to_vector(), values);
  const Tensor on_gpu = file.load("w", Device::cuda(0));
  EXPECT_TRUE(on_gpu.device().is_cuda());
  EXPECT_EQ(on_gpu.to_vector(), values);
}

TEST_F(Safetensors, LoadToCudaWithoutGpuIsAClearError) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present (RoundTripsThroughCudaInStagedChunks covers it)";
  const std::string p = path("m.safetensors");
  save_safetensors(p, {{"w", Tensor::zeros({2})}});
  EXPECT_HAS(message_of([&] { SafetensorsFile::open(p).load("w", Device::cuda(0)); }), "cuda:0");
}

}  // namespace
}  // namespace kraken::runtime
