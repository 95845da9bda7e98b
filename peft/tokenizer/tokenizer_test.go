package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"peft/peft/stories260k"
)

// Golden values from the embedded stories260K's golden.json (TestGoldenFile checks them against
// the file itself).
var (
	goldenPromptText = "Once upon a time"
	goldenPromptIDs  = []int{1, 403, 407, 261, 378}
	goldenGreedyIDs  = []int{403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310}
	goldenGreedyText = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily"
)

// storiesTokenizerJSON is the embedded stories260K model's tokenizer.json.
func storiesTokenizerJSON(t testing.TB) []byte {
	t.Helper()
	data, err := fs.ReadFile(stories260k.FS(), "tokenizer.json")
	require.NoError(t, err)
	return data
}

func loadStories(t testing.TB) *Tokenizer {
	t.Helper()
	tk, err := Parse(storiesTokenizerJSON(t))
	require.NoError(t, err)
	return tk
}

func readStoriesJSON(t testing.TB) map[string]any {
	t.Helper()
	data := storiesTokenizerJSON(t)
	var m map[string]any
	require.NoError(t, json.Unmarshal(data, &m))
	return m
}

func mustMarshal(t testing.TB, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	require.NoError(t, err)
	return data
}

func TestGolden(t *testing.T) {
	tk := loadStories(t)
	assert.Equal(t, goldenPromptIDs, tk.Encode(goldenPromptText))
	assert.Equal(t, goldenPromptIDs[1:], tk.EncodeNoSpecial(goldenPromptText))
	assert.Equal(t, goldenGreedyText, tk.Decode(goldenGreedyIDs, true))
	assert.Equal(t, goldenGreedyText, tk.Decode(append([]int{1}, goldenGreedyIDs...), true))
	assert.Equal(t, "<s> "+goldenGreedyText, tk.Decode(append([]int{1}, goldenGreedyIDs...), false))
	assert.Equal(t, append([]int{1}, goldenGreedyIDs...), tk.Encode(goldenGreedyText))
}

func TestGoldenFile(t *testing.T) {
	data, err := fs.ReadFile(stories260k.FS(), "golden.json")
	require.NoError(t, err)
	var g struct {
		Prompt struct {
			Text     string `json:"text"`
			InputIDs []int  `json:"input_ids"`
		} `json:"prompt"`
		Greedy struct {
			GeneratedIDs []int  `json:"generated_ids"`
			Sequence     []int  `json:"sequence_with_bos"`
			Text         string `json:"text"`
		} `json:"greedy"`
	}
	require.NoError(t, json.Unmarshal(data, &g))
	require.NotEmpty(t, g.Prompt.InputIDs)
	// Load reads the file from a folder or by its path.
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer.json"), storiesTokenizerJSON(t), 0o644))
	tk, err := Load(dir)
	require.NoError(t, err)
	_, err = Load(filepath.Join(dir, "tokenizer.json"))
	require.NoError(t, err)
	assert.Equal(t, g.Prompt.InputIDs, tk.Encode(g.Prompt.Text))
	assert.Equal(t, g.Greedy.Text, tk.Decode(g.Greedy.GeneratedIDs, true))
	assert.Equal(t, g.Greedy.Sequence, tk.Encode(g.Greedy.Text))
	assert.Equal(t, goldenPromptIDs, g.Prompt.InputIDs)
	assert.Equal(t, goldenGreedyIDs, g.Greedy.GeneratedIDs)
	assert.Equal(t, goldenGreedyText, g.Greedy.Text)
}

func TestSpecialIDs(t *testing.T) {
	tk := loadStories(t)
	assert.Equal(t, 1, tk.BOS())
	assert.Equal(t, 2, tk.EOS())
	assert.Equal(t, 0, tk.Unk())
	assert.Equal(t, 512, tk.VocabSize())
	assert.Equal(t, "<s>", tk.IDToken(1))
	assert.Equal(t, "<0x0A>", tk.IDToken(13))
	assert.Equal(t, "▁", tk.IDToken(410))
	assert.Equal(t, "", tk.IDToken(512))
	assert.Equal(t, "", tk.IDToken(-1))
	id, ok := tk.TokenID("</s>")
	assert.True(t, ok)
	assert.Equal(t, 2, id)
	_, ok = tk.TokenID("no such token")
	assert.False(t, ok)
	assert.True(t, tk.IsSpecial(0))
	assert.True(t, tk.IsSpecial(2))
	assert.False(t, tk.IsSpecial(3))
}

func TestRoundTrip(t *testing.T) {
	tk := loadStories(t)
	for _, s := range []string{
		"",
		"a",
		"Hello world",
		"Once upon a time, there was a little girl named Lily.",
		"two  spaces and   three",
		" leading space",
		"   three leading",
		"trailing space ",
		"trailing spaces   ",
		" ",
		"   ",
		"line one\nline two\n\nline four\n",
		"\n",
		"tab\there\t\tand\ttabs\t",
		"emoji 🙂 and 🐉🐉",
		"中文字符，日本語のテキスト",
		"café naïve résumé ñ €5",
		"mixed\r\nline endings\r",
		"\x00 control \x01\x7f chars",
		"quotes “double” ‘single’ — dash … ellipsis",
		"Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
		"\uFFFD replacement",
	} {
		ids := tk.Encode(s)
		assert.Equal(t, 1, ids[0], "%q", s)
		assert.Equal(t, s, tk.Decode(ids, true), "%q ids %v", s, ids)
		assert.Equal(t, s, tk.Decode(tk.EncodeNoSpecial(s), false), "%q", s)
	}
}

func TestByteFallback(t *testing.T) {
	tk := loadStories(t)
	byteIDs := func(s string) []int {
		var ids []int
		for i := 0; i < len(s); i++ {
			id, ok := tk.TokenID(fmt.Sprintf("<0x%02X>", s[i]))
			require.True(t, ok)
			ids = append(ids, id)
		}
		return ids
	}
	space, ok := tk.TokenID("▁")
	require.True(t, ok)
	require.Equal(t, 410, space)

	// "🙂" is not in the vocab: "▁" then the 4 UTF-8 bytes F0 9F 99 82.
	want := append([]int{1, space}, byteIDs("🙂")...)
	assert.Equal(t, []int{1, 410, 0xF0 + 3, 0x9F + 3, 0x99 + 3, 0x82 + 3}, want)
	assert.Equal(t, want, tk.Encode("🙂"))

	// "中" (E4 B8 AD) likewise.
	assert.Equal(t, append([]int{space}, byteIDs("中")...), tk.EncodeNoSpecial("中"))

	// "é" is in the vocab: no byte tokens.
	e, ok := tk.TokenID("é")
	require.True(t, ok)
	assert.Equal(t, []int{space, e}, tk.EncodeNoSpecial("é"))

	// Newline and tab are byte tokens between BPE pieces.
	assert.Equal(t, []int{13}, tk.EncodeNoSpecial("\n")[1:])
	ids := tk.EncodeNoSpecial("a\tb")
	assert.Contains(t, ids, 12) // <0x09>

	// Byte tokens that do not form valid UTF-8 decode to U+FFFD, one per byte.
	assert.Equal(t, "a\uFFFD\uFFFD b", tk.Decode([]int{261, 0xF0 + 3, 0x9F + 3, 268}, true))
	// Invalid UTF-8 input is encoded as U+FFFD (EF BF BD) per invalid byte.
	assert.Equal(t, tk.EncodeNoSpecial("x\uFFFD\uFFFDy"), tk.EncodeNoSpecial("x\xff\xfey"))
}

func TestAddedTokensInText(t *testing.T) {
	tk := loadStories(t)
	// As Hugging Face: added tokens in the text are matched first, each text
	// piece is then normalized on its own (so it gets its own "▁").
	assert.Equal(t, []int{1, 261, 2, 268, 1}, tk.Encode("a</s>b<s>"))
	assert.Equal(t, []int{2}, tk.EncodeNoSpecial("</s>"))
	assert.Equal(t, "a b", tk.Decode(tk.Encode("a</s>b<s>"), true))
	assert.Equal(t, "<s> a</s> b<s>", tk.Decode(tk.Encode("a</s>b<s>"), false))
	// Unknown ids are skipped.
	assert.Equal(t, "a", tk.Decode([]int{-5, 261, 9999}, true))
}

func TestMergesPairForm(t *testing.T) {
	m := readStoriesJSON(t)
	model := m["model"].(map[string]any)
	var pairs [][]string
	for _, s := range model["merges"].([]any) {
		a, b, _ := strings.Cut(s.(string), " ")
		pairs = append(pairs, []string{a, b})
	}
	model["merges"] = pairs
	tk2, err := Parse(mustMarshal(t, m))
	require.NoError(t, err)
	tk := loadStories(t)
	for _, s := range []string{goldenPromptText, goldenGreedyText, "the theme then"} {
		assert.Equal(t, tk.Encode(s), tk2.Encode(s))
	}
}

// llama2cEncode is an independent reference: llama2.c's / SentencePiece's
// encoder (dummy prefix, per-character lookup with byte fallback, then merge
// the adjacent pair whose concatenation has the highest score, leftmost on
// ties). For stories260K the score of piece id 259+k is -k (its README).
func llama2cEncode(tk *Tokenizer, text string) []int {
	score := func(id int) float64 {
		if id >= 259 && id <= 409 {
			return -float64(id - 259)
		}
		return -1e9
	}
	if text == "" {
		return nil
	}
	text = "▁" + strings.ReplaceAll(text, " ", "▁")
	var ids []int
	for _, r := range text {
		if id, ok := tk.vocab[string(r)]; ok {
			ids = append(ids, id)
			continue
		}
		for _, b := range []byte(string(r)) {
			ids = append(ids, int(b)+3)
		}
	}
	for {
		best, bestScore, bestID := -1, -1e10, -1
		for i := 0; i+1 < len(ids); i++ {
			id, ok := tk.vocab[tk.IDToken(ids[i])+tk.IDToken(ids[i+1])]
			if ok && score(id) > bestScore {
				best, bestScore, bestID = i, score(id), id
			}
		}
		if best < 0 {
			return ids
		}
		ids[best] = bestID
		ids = append(ids[:best+1], ids[best+2:]...)
	}
}

func TestAgainstLlama2cReference(t *testing.T) {
	tk := loadStories(t)
	alphabet := []rune("abcdefghijklmnopqrstuvwxyz   ..,!?'\"\nThe LilyOnce upon a time\t🙂中é—")
	rng := rand.New(rand.NewSource(1))
	texts := []string{goldenPromptText, goldenGreedyText, "the the the", "  a  b  "}
	for range 500 {
		n := rng.Intn(60)
		rs := make([]rune, n)
		for i := range rs {
			rs[i] = alphabet[rng.Intn(len(alphabet))]
		}
		texts = append(texts, string(rs))
	}
	for _, s := range texts {
		want := llama2cEncode(tk, s)
		got := tk.EncodeNoSpecial(s)
		if len(want) == 0 {
			assert.Empty(t, got, "%q", s)
			continue
		}
		assert.Equal(t, want, got, "%q", s)
		assert.Equal(t, s, tk.Decode(got, true), "%q", s)
	}
}

// TestMetaspaceVariant checks the newer (non-legacy) Llama conversion:
// normalizer null, pre_tokenizer Metaspace(prepend_scheme "first", split false).
func TestMetaspaceVariant(t *testing.T) {
	m := readStoriesJSON(t)
	m["normalizer"] = nil
	m["pre_tokenizer"] = map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}
	tk2, err := Parse(mustMarshal(t, m))
	require.NoError(t, err)
	tk := loadStories(t)
	assert.Equal(t, goldenPromptIDs, tk2.Encode(goldenPromptText))
	assert.Equal(t, tk.Encode(goldenGreedyText), tk2.Encode(goldenGreedyText))
	// Metaspace does not prepend when the text already starts with a space.
	assert.Equal(t, tk.EncodeNoSpecial("hi"), tk2.EncodeNoSpecial(" hi"))
	// "first": no "▁" for the piece after an added token.
	b, ok := tk2.TokenID("b")
	require.True(t, ok)
	assert.Equal(t, []int{261, 2, b}, tk2.EncodeNoSpecial("a</s>b"))

	// split true cuts before each "▁"; no merge crosses a word boundary here
	// anyway, so ids are unchanged.
	m["pre_tokenizer"] = map[string]any{"type": "Metaspace", "replacement": "▁", "add_prefix_space": true}
	tk3, err := Parse(mustMarshal(t, m))
	require.NoError(t, err)
	assert.Equal(t, tk.Encode(goldenGreedyText), tk3.Encode(goldenGreedyText))
	assert.Equal(t, []int{1, 261, 2, 268}, tk3.Encode("a</s>b")) // "always"

	// The Metaspace decoder drops "▁" in the first token only.
	m["decoder"] = map[string]any{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
	tk4, err := Parse(mustMarshal(t, m))
	require.NoError(t, err)
	assert.Equal(t, "Once upon a time", tk4.Decode(goldenPromptIDs, true))
}

// small builds a tokenizer.json over a tiny vocabulary.
func small(t testing.TB, model map[string]any, extra map[string]any) []byte {
	m := map[string]any{
		"version":      "1.0",
		"added_tokens": []any{},
		"model":        model,
	}
	for k, v := range extra {
		m[k] = v
	}
	return mustMarshal(t, m)
}

func TestUnkAndIgnoreMerges(t *testing.T) {
	vocab := map[string]int{"<unk>": 0, "a": 1, "b": 2, "ab": 3, "abab": 4}
	model := map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{"a b", "ab ab"}, "unk_token": "<unk>"}
	tk, err := Parse(small(t, model, nil))
	require.NoError(t, err)
	assert.Equal(t, []int{1, 0, 0, 2}, tk.Encode("accb"))
	assert.Equal(t, []int{4, 1}, tk.Encode("ababa"))
	assert.Equal(t, -1, tk.BOS())
	assert.Equal(t, -1, tk.EOS())
	assert.Equal(t, "a <unk> <unk> b", tk.Decode(tk.Encode("accb"), false)) // no decoder: join with " "

	model["fuse_unk"] = true
	tk, err = Parse(small(t, model, nil))
	require.NoError(t, err)
	assert.Equal(t, []int{1, 0, 2, 0}, tk.Encode("acdbé"))

	// ignore_merges: a word that is in the vocab is taken whole. Without it,
	// "abab" still merges to "abab" here, so use a vocab where it would not.
	vocab2 := map[string]int{"<unk>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4, "aba": 5}
	model2 := map[string]any{"type": "BPE", "vocab": vocab2, "merges": []string{"b a", "a b"}, "unk_token": "<unk>"}
	tk, err = Parse(small(t, model2, nil))
	require.NoError(t, err)
	assert.Equal(t, []int{1, 4}, tk.Encode("aba"))
	model2["ignore_merges"] = true
	tk, err = Parse(small(t, model2, nil))
	require.NoError(t, err)
	assert.Equal(t, []int{5}, tk.Encode("aba"))
	assert.Equal(t, []int{4, 4}, tk.Encode("baba"))
}

func TestMergeOrder(t *testing.T) {
	// Lowest rank first, leftmost on ties: "aaa" with "a a" gives "aa a".
	vocab := map[string]int{"<unk>": 0, "a": 1, "aa": 2, "b": 3, "ab": 4, "aab": 5}
	tk, err := Parse(small(t, map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{"a a", "a b", "aa b"}, "unk_token": "<unk>"}, nil))
	require.NoError(t, err)
	assert.Equal(t, []int{2, 1}, tk.Encode("aaa"))
	assert.Equal(t, []int{2, 2}, tk.Encode("aaaa"))
	assert.Equal(t, []int{5}, tk.Encode("aab"))
	assert.Equal(t, []int{4}, tk.Encode("ab"))
	// With "a b" ranked first, "aab" becomes a + ab.
	tk, err = Parse(small(t, map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{"a b", "a a", "aa b"}, "unk_token": "<unk>"}, nil))
	require.NoError(t, err)
	assert.Equal(t, []int{1, 4}, tk.Encode("aab"))
}

func TestTemplateForms(t *testing.T) {
	vocab := map[string]int{"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
	model := map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{}, "unk_token": "<unk>"}
	special := map[string]any{
		"<s>":  map[string]any{"id": "<s>", "ids": []int{1}, "tokens": []string{"<s>"}},
		"</s>": map[string]any{"id": "</s>", "ids": []int{2}, "tokens": []string{"</s>"}},
	}
	for _, single := range []any{
		"<s> $A </s>",
		"<s>:0 $A:0 </s>:0",
		[]string{"<s>", "$A", "</s>"},
		[]any{
			map[string]any{"SpecialToken": map[string]any{"id": "<s>", "type_id": 0}},
			map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}},
			map[string]any{"SpecialToken": map[string]any{"id": "</s>", "type_id": 0}},
		},
	} {
		pp := map[string]any{"type": "TemplateProcessing", "single": single, "pair": "$A $B", "special_tokens": special}
		tk, err := Parse(small(t, model, map[string]any{"post_processor": pp}))
		require.NoError(t, err, "%v", single)
		assert.Equal(t, []int{1, 3, 3, 2}, tk.Encode("aa"), "%v", single)
		assert.Equal(t, []int{3, 3}, tk.EncodeNoSpecial("aa"))
	}
}

func TestParseErrors(t *testing.T) {
	base := func() map[string]any { return readStoriesJSON(t) }
	model := func(m map[string]any) map[string]any { return m["model"].(map[string]any) }
	cases := []struct {
		name        string
		data        func() []byte
		want        string
		unsupported bool
	}{
		{"not JSON", func() []byte { return []byte("{not json") }, "not JSON", false},
		{"JSON array", func() []byte { return []byte("[1,2]") }, "not JSON", false},
		{"empty", func() []byte { return nil }, "not JSON", false},
		{"no model", func() []byte { return []byte(`{"version":"1.0"}`) }, "no model", false},
		{"WordPiece", func() []byte {
			m := base()
			model(m)["type"] = "WordPiece"
			return mustMarshal(t, m)
		}, `model type "WordPiece"`, true},
		{"normalizers that grow the text without bound", func() []byte {
			m := base()
			var steps []any
			for range 26 {
				steps = append(steps, map[string]any{"type": "Replace", "pattern": map[string]any{"String": "a"}, "content": "aa"})
			}
			m["normalizer"] = map[string]any{"type": "Sequence", "normalizers": steps}
			return mustMarshal(t, m)
		}, "its Replace steps can grow a text 6.71e+07 times (a chain of replacements that each lengthen it); the limit is 16", false},
		{"missing vocab", func() []byte {
			m := base()
			delete(model(m), "vocab")
			return mustMarshal(t, m)
		}, "no vocab", false},
		{"empty vocab", func() []byte {
			m := base()
			model(m)["vocab"] = map[string]int{}
			return mustMarshal(t, m)
		}, "vocab is empty", false},
		{"negative id", func() []byte {
			m := base()
			model(m)["vocab"].(map[string]any)["zz"] = -3
			return mustMarshal(t, m)
		}, "out of range", false},
		{"duplicate id", func() []byte {
			m := base()
			model(m)["vocab"].(map[string]any)["zz"] = 5
			return mustMarshal(t, m)
		}, "share id 5", false},
		{"missing merges", func() []byte {
			m := base()
			delete(model(m), "merges")
			return mustMarshal(t, m)
		}, "no merges", false},
		{"merge unknown token", func() []byte {
			m := base()
			model(m)["merges"] = append(model(m)["merges"].([]any), "▁t qqq")
			return mustMarshal(t, m)
		}, `token "qqq" is not in the vocab`, false},
		{"merged token unknown", func() []byte {
			m := base()
			model(m)["merges"] = []any{"a b"}
			return mustMarshal(t, m)
		}, `merged token "ab" is not in the vocab`, false},
		{"bad merge string", func() []byte {
			m := base()
			model(m)["merges"] = []any{"ab"}
			return mustMarshal(t, m)
		}, `not of the form`, false},
		{"bad merge pair", func() []byte {
			m := base()
			model(m)["merges"] = []any{[]string{"a", "b", "c"}}
			return mustMarshal(t, m)
		}, `merge 0`, false},
		{"dropout", func() []byte {
			m := base()
			model(m)["dropout"] = 0.1
			return mustMarshal(t, m)
		}, "dropout", true},
		{"unk not in vocab", func() []byte {
			m := base()
			model(m)["unk_token"] = "<nope>"
			return mustMarshal(t, m)
		}, `unk_token "<nope>" is not in the vocab`, false},
		{"no unk, no byte fallback", func() []byte {
			m := base()
			model(m)["unk_token"] = nil
			model(m)["byte_fallback"] = false
			return mustMarshal(t, m)
		}, "no unk_token and no byte_fallback", false},
		{"normalizer Precompiled", func() []byte {
			m := base()
			m["normalizer"] = map[string]any{"type": "Precompiled", "precompiled_charsmap": "AAAA"}
			return mustMarshal(t, m)
		}, `normalizer type "Precompiled"`, true},
		{"nested normalizer", func() []byte {
			m := base()
			m["normalizer"].(map[string]any)["normalizers"] = append(m["normalizer"].(map[string]any)["normalizers"].([]any), map[string]any{"type": "Lowercase"})
			return mustMarshal(t, m)
		}, `normalizer type "Lowercase"`, true},
		{"regex replace", func() []byte {
			m := base()
			m["normalizer"] = map[string]any{"type": "Replace", "pattern": map[string]any{"Regex": " +"}, "content": "▁"}
			return mustMarshal(t, m)
		}, "Regex", true},
		{"pre_tokenizer Whitespace", func() []byte {
			m := base()
			m["pre_tokenizer"] = map[string]any{"type": "Whitespace"}
			return mustMarshal(t, m)
		}, `pre_tokenizer type "Whitespace"`, true},
		{"byte-level without its byte characters", func() []byte {
			m := base()
			model(m)["unk_token"] = nil
			model(m)["byte_fallback"] = false
			m["pre_tokenizer"] = map[string]any{"type": "ByteLevel", "add_prefix_space": false}
			return mustMarshal(t, m)
		}, `the ByteLevel pre-tokenizer's character`, false},
		{"split inverted", func() []byte {
			m := base()
			m["pre_tokenizer"] = map[string]any{"type": "Split", "pattern": map[string]any{"Regex": " "}, "behavior": "Isolated", "invert": true}
			return mustMarshal(t, m)
		}, "invert: true", true},
		{"split behavior", func() []byte {
			m := base()
			m["pre_tokenizer"] = map[string]any{"type": "Split", "pattern": map[string]any{"Regex": " "}, "behavior": "Sideways"}
			return mustMarshal(t, m)
		}, `behavior "Sideways"`, true},
		{"split bad regex", func() []byte {
			m := base()
			m["pre_tokenizer"] = map[string]any{"type": "Split", "pattern": map[string]any{"Regex": "(("}, "behavior": "Isolated"}
			return mustMarshal(t, m)
		}, "Split pattern", false},
		{"decoder WordPiece", func() []byte {
			m := base()
			m["decoder"] = map[string]any{"type": "WordPiece"}
			return mustMarshal(t, m)
		}, `decoder type "WordPiece"`, true},
		{"decoder without type", func() []byte {
			m := base()
			m["decoder"] = map[string]any{}
			return mustMarshal(t, m)
		}, "decoder has no type", false},
		{"post_processor Roberta", func() []byte {
			m := base()
			m["post_processor"] = map[string]any{"type": "RobertaProcessing"}
			return mustMarshal(t, m)
		}, `post_processor type "RobertaProcessing"`, true},
		{"template unknown special", func() []byte {
			m := base()
			delete(m["post_processor"].(map[string]any)["special_tokens"].(map[string]any), "<s>")
			return mustMarshal(t, m)
		}, `special token "<s>" that is not in its special_tokens`, false},
		{"truncation", func() []byte {
			m := base()
			m["truncation"] = map[string]any{"max_length": 8}
			return mustMarshal(t, m)
		}, "truncation", true},
		{"added token lstrip", func() []byte {
			m := base()
			m["added_tokens"].([]any)[1].(map[string]any)["lstrip"] = true
			return mustMarshal(t, m)
		}, `added token "<s>" has lstrip`, true},
		{"added token without id", func() []byte {
			m := base()
			delete(m["added_tokens"].([]any)[1].(map[string]any), "id")
			return mustMarshal(t, m)
		}, `"<s>" has no id`, false},
		{"vocab of wrong type", func() []byte {
			m := base()
			model(m)["vocab"] = []int{1, 2}
			return mustMarshal(t, m)
		}, "model vocab", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tk, err := Parse(c.data())
			require.Error(t, err)
			assert.Nil(t, tk)
			assert.Contains(t, err.Error(), c.want)
			assert.Equal(t, c.unsupported, errors.Is(err, ErrUnsupported), "ErrUnsupported for %v", err)
		})
	}

	_, err := Load(filepath.Join(t.TempDir(), "missing"))
	assert.Error(t, err)
	bad := filepath.Join(t.TempDir(), "tokenizer.json")
	require.NoError(t, os.WriteFile(bad, []byte(`{"model": {"type": "Unigram"}}`), 0o644))
	_, err = Load(filepath.Dir(bad))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `model type "Unigram"`)
	assert.Contains(t, err.Error(), bad)
}

func BenchmarkEncode10KB(b *testing.B) {
	tk := loadStories(b)
	var sb strings.Builder
	for sb.Len() < 10*1024 {
		sb.WriteString(goldenGreedyText)
		sb.WriteString(" 🙂 中文\n")
	}
	text := strings.ToValidUTF8(sb.String()[:10*1024], "")
	b.SetBytes(int64(len(text)))
	b.ResetTimer()
	for b.Loop() {
		tk.Encode(text)
	}
}

func BenchmarkDecode10KB(b *testing.B) {
	tk := loadStories(b)
	text := strings.Repeat(goldenGreedyText+" 🙂\n", 10*1024/len(goldenGreedyText))
	ids := tk.Encode(text)
	b.SetBytes(int64(len(text)))
	b.ResetTimer()
	for b.Loop() {
		tk.Decode(ids, true)
	}
}
