// Writes peft/tokenizer/testdata/bytelevel/expected.json: for each fixture tokenizer and each
// text, the ids and tokens Hugging Face's tokenizers library (npm `tokenizers`, the Rust
// implementation) gives with special tokens added, and its decoding of them. See
// scripts/tokenizer_fixtures.py for how to run it.
const fs = require("fs");
const path = require("path");
const { Tokenizer } = require("tokenizers");

const dir = path.join(__dirname, "..", "peft", "tokenizer", "testdata", "bytelevel");
const texts = [
  "Hello world",
  "Hello, world! How's it going? I'LL do it; we'd've gone.",
  "  leading spaces,   runs of   spaces and trailing   ",
  "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
  "numbers 1234567 3.14159 and 2024-12-02, 007",
  "accents: café naïve résumé Ångström São Paulo",
  "decomposed: cafe\u0301 e\u0300 o\u0308",
  "emoji 😀👍🏽 and 🇫🇷 flags, ZWJ 👩‍💻",
  "CJK: 你好，世界。日本語のテキスト。한국어",
  "mixed русский ελληνικά العربية עברית",
  "code: func main() { fmt.Println(\"hi\") } // x := a[i] + b*2",
  "<|endoftext|>special<|im_start|>tokens<|eot_id|> in text",
  "",
  " ",
  "'s's 'S 'T 're're",
  "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
];

async function main() {
  const out = {};
  for (const file of fs.readdirSync(dir).filter((f) => f.endsWith(".json") && f !== "expected.json").sort()) {
    const tok = Tokenizer.fromFile(path.join(dir, file));
    out[file] = [];
    for (const text of texts) {
      const enc = await tok.encode(text);
      const ids = enc.getIds();
      out[file].push({ text, ids, tokens: enc.getTokens(), decoded: await tok.decode(ids, false), decoded_skip: await tok.decode(ids, true) });
    }
  }
  fs.writeFileSync(path.join(dir, "expected.json"), JSON.stringify(out, null, 1));
  console.log("wrote", Object.keys(out).map((f) => `${f}: ${out[f].length} texts`).join(", "));
}
main();
