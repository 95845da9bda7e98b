package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// byteLevelCase is one text of testdata/bytelevel/expected.json with what Hugging Face's
// tokenizers library (npm `tokenizers`, the Rust implementation; scripts/tokenizer_reference.js)
// gives for it.
type byteLevelCase struct {
	Text        string   `json:"text"`
	IDs         []int    `json:"ids"`
	Tokens      []string `json:"tokens"`
	Decoded     string   `json:"decoded"`
	DecodedSkip string   `json:"decoded_skip"`
}

func byteLevelExpected(t testing.TB) map[string][]byteLevelCase {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "bytelevel", "expected.json"))
	require.NoError(t, err)
	var exp map[string][]byteLevelCase
	require.NoError(t, json.Unmarshal(data, &exp))
	require.Len(t, exp, 5)
	return exp
}

// The byte-level files laid out as GPT-2, Llama 3, Qwen2 and SmolLM2 write them (ByteLevel with
// GPT-2's regex; Split with Llama 3's or Qwen2's regex, lookahead included, then ByteLevel;
// ignore_merges; NFC; Digits; special tokens; template post-processors) encode every text as
// Hugging Face's own tokenizers does, id for id, and decode back to its text: accents, decomposed
// accents, digits, emoji with modifiers and ZWJ, CJK, other scripts, runs of spaces, tabs,
// newlines, CRLF, Unicode spaces, contractions in any case, special tokens in the text.
func TestByteLevelMatchesHuggingFace(t *testing.T) {
	total := 0
	for file, cases := range byteLevelExpected(t) {
		tk, err := Load(filepath.Join("testdata", "bytelevel", file))
		require.NoError(t, err, file)
		for _, c := range cases {
			ids := tk.Encode(c.Text)
			require.Equal(t, c.IDs, ids, "%s: %q", file, c.Text)
			tokens := make([]string, len(ids))
			for i, id := range ids {
				tokens[i] = tk.IDToken(id)
			}
			require.Equal(t, c.Tokens, tokens, "%s: %q", file, c.Text)
			require.Equal(t, c.Decoded, tk.Decode(ids, false), "%s: decode %q", file, c.Text)
			require.Equal(t, c.DecodedSkip, tk.Decode(ids, true), "%s: decode skipping special %q", file, c.Text)
			total++
		}
	}
	t.Logf("%d texts, ids, tokens and decodings equal to Hugging Face's", total)
}

// FuzzByteLevelRoundTrip checks, on each byte-level fixture, that any text encodes to ids of the
// vocabulary without panicking and decodes back to itself: byte-level BPE loses nothing (after
// the replacement of invalid UTF-8, and NFC where the file normalizes). Run longer with
// go test -run '^$' -fuzz FuzzByteLevelRoundTrip ./peft/tokenizer/.
func FuzzByteLevelRoundTrip(f *testing.F) {
	var tks []*Tokenizer
	var names []string
	for _, name := range []string{"gpt2.json", "llama3.json", "qwen2.json", "smollm2.json"} {
		tk, err := Load(filepath.Join("testdata", "bytelevel", name))
		if err != nil {
			f.Fatal(err)
		}
		tks, names = append(tks, tk), append(names, name)
	}
	for _, c := range byteLevelExpected(f)["gpt2.json"] {
		f.Add(c.Text)
	}
	f.Add("\xff\xfe broken \xe2\x82 utf-8 \xf0\x9f")
	f.Add("<|im_start|><|im_start|><|eot_id|>")
	f.Fuzz(func(t *testing.T, text string) {
		for i, tk := range tks {
			ids := tk.EncodeNoSpecial(text)
			for _, id := range ids {
				if _, ok := tk.idToTok[id]; !ok {
					t.Fatalf("%s: Encode(%q) gave unknown id %d", names[i], text, id)
				}
			}
			want := toValidUTF8(text)
			if tk.normalizer != nil {
				want = tk.normalizer.normalize(want)
			}
			if got := tk.Decode(ids, false); got != want {
				t.Fatalf("%s: %q decodes to %q", names[i], want, got)
			}
		}
	})
}
