// Package tokenizer reads Hugging Face tokenizer.json files of the BPE kinds that decoder models
// use, and encodes and decodes text the way the Hugging Face `tokenizers` library does for them:
// Llama-2 / SentencePiece-style BPE with byte fallback, and byte-level BPE as GPT-2, Llama 3,
// Qwen2/2.5 and SmolLM2 write it.
//
// The kinds it implements, section by section of tokenizer.json:
//
//   - added_tokens: matched in the raw text before anything else (leftmost,
//     longest first), as Hugging Face does; a literal "<s>" in the text becomes
//     the <s> token. Tokens with "normalized": true are matched in the
//     normalized text instead. lstrip, rstrip and single_word must be false.
//   - normalizer: null, Replace (string pattern), Prepend, NFC, NFD, NFKC, NFKD,
//     or a Sequence of these. Llama-2 files have Sequence[Prepend("▁"),
//     Replace(" " → "▁")]; Qwen2's have NFC.
//   - pre_tokenizer: null (the whole normalized text is one BPE word),
//     Metaspace (the newer, non-legacy Llama conversion), ByteLevel (GPT-2's
//     byte-to-character map, with GPT-2's regex split when use_regex), Split
//     with a Regex or String pattern (behavior Isolated, invert false), Digits,
//     or a Sequence of these. Split regexes run on regexp2, which has the lookahead
//     (\s+(?!\S)) and Unicode classes (\p{L}, \p{N}, \s) of Llama 3's and Qwen2's
//     patterns that Go's regexp lacks.
//   - model: BPE with vocab, ranked merges ("a b" strings or ["a", "b"]
//     pairs), byte_fallback (a character that is not in the vocabulary becomes
//     the <0xNN> tokens of its UTF-8 bytes), unk_token, fuse_unk and
//     ignore_merges (Llama 3: a word that is itself in the vocabulary is one
//     token). dropout must be null or 0, continuing_subword_prefix and
//     end_of_word_suffix must be empty. Without unk_token, every character must
//     reach the vocabulary (byte fallback, or ByteLevel's 256 characters).
//   - post_processor: null, TemplateProcessing (Encode applies its "single"
//     template: Llama-2's "<s>" $A, Llama 3's <|begin_of_text|> $A), ByteLevel
//     (it only adjusts offsets), or a Sequence of these. The "pair" template is
//     not used.
//   - decoder: null, Replace, ByteFallback, Fuse, Strip, Metaspace, ByteLevel
//     (bytes back, invalid UTF-8 replaced as Rust's from_utf8_lossy does), or a
//     Sequence of these. Llama-2 files have Sequence[Replace("▁" → " "),
//     ByteFallback, Fuse, Strip(" ", 1, 0)].
//   - truncation and padding must be null.
//
// Anything else is rejected by Parse with an error that names it; nothing in
// a file is silently ignored except the "pair" template, the "version" field,
// "type_id"s (which only matter for pairs) and offset trimming.
//
// tokenizer_config.json is not read: whether <s> is added comes from the
// post_processor in tokenizer.json (transformers rebuilds that template from
// add_bos_token/add_eos_token, and the two agree in files it saved).
package tokenizer

import (
	"fmt"
	"os"
	"path/filepath"
	"peft/peft/files"
	"strings"
	"unicode/utf8"
)

// Tokenizer encodes text to token ids and decodes ids to text. It is safe for
// concurrent use once built.
type Tokenizer struct {
	vocab   map[string]int // the model's vocabulary
	idToTok map[int]string // model vocabulary and added tokens (added win)
	vocabSz int            // max id + 1

	merges        map[uint64]mergeVal
	byteIDs       [256]int32 // id of <0xNN>, -1 when missing
	byteFallback  bool
	allByteTokens bool // every <0xNN> token is in the vocabulary
	unkID         int  // -1 when there is no unk token
	fuseUnk       bool
	ignoreMerges  bool

	added        map[string]int // added token content -> id
	special      map[int]bool   // ids of added tokens with special: true
	rawMatcher   *matcher       // added tokens with normalized: false
	normMatcher  *matcher       // added tokens with normalized: true
	normalizer   normalizer     // nil for none
	preTokenizer preTokenizer   // nil for none
	template     []templatePiece
	hasTemplate  bool
	decoder      decoder // nil for none: tokens are joined with " "
}

// Load reads a tokenizer.json file, or the tokenizer.json in a folder.
func Load(path string) (*Tokenizer, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "tokenizer.json")
	}
	data, err := files.ReadPath(path, files.MaxTokenizer)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return t, nil
}

// VocabSize is the largest token id (of the model vocabulary and the added
// tokens) plus one: the number of rows an embedding table needs.
func (t *Tokenizer) VocabSize() int { return t.vocabSz }

// BOS is the id of "<s>", or -1 when the file has no such token.
func (t *Tokenizer) BOS() int { return t.idOr("<s>") }

// EOS is the id of "</s>", or -1 when the file has no such token.
func (t *Tokenizer) EOS() int { return t.idOr("</s>") }

// Unk is the id of the model's unk_token, or -1 when it has none.
func (t *Tokenizer) Unk() int { return t.unkID }

func (t *Tokenizer) idOr(tok string) int {
	if id, ok := t.TokenID(tok); ok {
		return id
	}
	return -1
}

// IDToken returns the token string of an id ("" for an unknown id).
func (t *Tokenizer) IDToken(id int) string { return t.idToTok[id] }

// TokenID returns the id of a token string; added tokens are looked up first,
// then the model vocabulary, as Hugging Face does.
func (t *Tokenizer) TokenID(tok string) (int, bool) {
	if id, ok := t.added[tok]; ok {
		return id, true
	}
	id, ok := t.vocab[tok]
	return id, ok
}

// IsSpecial reports whether id is an added token marked "special": true
// (those are the tokens Decode skips when asked).
func (t *Tokenizer) IsSpecial(id int) bool { return t.special[id] }

// Encode tokenizes text and applies the post-processor's single-sequence
// template (for Llama-2 files: <s> first). Text that is not valid UTF-8 has
// each invalid byte replaced by U+FFFD first.
func (t *Tokenizer) Encode(text string) []int {
	ids := t.EncodeNoSpecial(text)
	if !t.hasTemplate {
		return ids
	}
	n := len(ids)
	for _, p := range t.template {
		n += len(p.ids)
	}
	out := make([]int, 0, n)
	for _, p := range t.template {
		if p.sequence {
			out = append(out, ids...)
		} else {
			out = append(out, p.ids...)
		}
	}
	return out
}

// EncodeNoSpecial tokenizes text without the post-processor's special tokens.
// Added tokens written literally in text (such as "</s>") are still matched,
// as Hugging Face does.
func (t *Tokenizer) EncodeNoSpecial(text string) []int {
	if !utf8.ValidString(text) {
		text = toValidUTF8(text)
	}
	ids := make([]int, 0, len(text)/2+2)
	for _, seg := range t.rawMatcher.split(text) {
		if seg.id >= 0 {
			ids = append(ids, seg.id)
			continue
		}
		norm := seg.text
		if t.normalizer != nil {
			norm = t.normalizer.normalize(norm)
		}
		for _, sub := range t.normMatcher.split(norm) {
			if sub.id >= 0 {
				ids = append(ids, sub.id)
				continue
			}
			if t.preTokenizer == nil {
				ids = t.bpe(ids, sub.text)
				continue
			}
			first := seg.start == 0 && sub.start == 0
			for _, w := range t.preTokenizer.split(sub.text, first) {
				ids = t.bpe(ids, w)
			}
		}
	}
	return ids
}

// Decode turns ids back into text through the file's decoder. Ids that are
// not in the vocabulary are skipped; with skipSpecial, so are the special
// added tokens (for Llama-2 files <unk>, <s> and </s>).
func (t *Tokenizer) Decode(ids []int, skipSpecial bool) string {
	toks := make([]string, 0, len(ids))
	for _, id := range ids {
		tok, ok := t.idToTok[id]
		if !ok || (skipSpecial && t.special[id]) {
			continue
		}
		toks = append(toks, tok)
	}
	if t.decoder == nil {
		return strings.Join(toks, " ")
	}
	return strings.Join(t.decoder.decode(toks), "")
}

// toValidUTF8 replaces each byte of an invalid UTF-8 sequence by U+FFFD.
func toValidUTF8(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 8)
	for _, r := range s { // range yields U+FFFD for each invalid byte
		b.WriteRune(r)
	}
	return b.String()
}

// segment is a piece of text, or an added token (id >= 0), with its byte
// offset in the string it was cut from.
type segment struct {
	text  string
	id    int
	start int
}

// matcher finds added tokens in text: at the leftmost position where any
// matches, the longest one wins (Hugging Face's LeftmostLongest).
type matcher struct {
	byFirst map[byte][]addedToken // sorted by length, longest first
}

type addedToken struct {
	content string
	id      int
}

// split cuts text at the added tokens it contains. A nil matcher returns the
// whole text as one piece.
func (m *matcher) split(text string) []segment {
	if m == nil || len(m.byFirst) == 0 {
		return []segment{{text: text, id: -1}}
	}
	var out []segment
	last := 0
	for i := 0; i < len(text); i++ {
		cands := m.byFirst[text[i]]
		for _, c := range cands {
			if strings.HasPrefix(text[i:], c.content) {
				if i > last {
					out = append(out, segment{text: text[last:i], id: -1, start: last})
				}
				out = append(out, segment{text: c.content, id: c.id, start: i})
				i += len(c.content) - 1
				last = i + 1
				break
			}
		}
	}
	if last < len(text) || len(out) == 0 {
		out = append(out, segment{text: text[last:], id: -1, start: last})
	}
	return out
}
