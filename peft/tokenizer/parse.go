package tokenizer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
	"golang.org/x/text/unicode/norm"
)

// ErrUnsupported is wrapped by the errors about well-formed tokenizer.json
// content that this package does not implement (another normalizer, model,
// decoder, ...). Other Parse errors are about malformed files.
var ErrUnsupported = errors.New("unsupported")

// maxDepth bounds the nesting of Sequence normalizers/pre-tokenizers/decoders.
const maxDepth = 16

func errorf(format string, args ...any) error {
	return fmt.Errorf("tokenizer: "+format, args...)
}

func unsupported(format string, args ...any) error {
	return fmt.Errorf("tokenizer: %w: "+format, append([]any{ErrUnsupported}, args...)...)
}

type fileJSON struct {
	Truncation    json.RawMessage  `json:"truncation"`
	Padding       json.RawMessage  `json:"padding"`
	AddedTokens   []addedTokenJSON `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
	Model         json.RawMessage  `json:"model"`
}

type addedTokenJSON struct {
	ID         *int   `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

type modelJSON struct {
	Type                    string          `json:"type"`
	Dropout                 *float64        `json:"dropout"`
	UnkToken                *string         `json:"unk_token"`
	ContinuingSubwordPrefix *string         `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string         `json:"end_of_word_suffix"`
	FuseUnk                 bool            `json:"fuse_unk"`
	ByteFallback            bool            `json:"byte_fallback"`
	IgnoreMerges            bool            `json:"ignore_merges"`
	Vocab                   json.RawMessage `json:"vocab"`
	Merges                  json.RawMessage `json:"merges"`
}

// component is the common shape of normalizers, pre-tokenizers, decoders and
// post-processors: a "type" plus fields.
type component struct {
	Type string `json:"type"`
	// Sequence
	Normalizers   []json.RawMessage `json:"normalizers"`
	PreTokenizers []json.RawMessage `json:"pretokenizers"`
	Decoders      []json.RawMessage `json:"decoders"`
	// Replace
	Pattern *patternJSON `json:"pattern"`
	Content *string      `json:"content"`
	// Prepend
	Prepend *string `json:"prepend"`
	// Strip
	Start *int `json:"start"`
	Stop  *int `json:"stop"`
	// Metaspace
	Replacement    *string `json:"replacement"`
	PrependScheme  *string `json:"prepend_scheme"`
	AddPrefixSpace *bool   `json:"add_prefix_space"`
	Split          *bool   `json:"split"`
	// TemplateProcessing
	Single        json.RawMessage            `json:"single"`
	SpecialTokens map[string]specialTokenDef `json:"special_tokens"`
	// ByteLevel
	UseRegex *bool `json:"use_regex"`
	// Split
	Behavior *string `json:"behavior"`
	Invert   *bool   `json:"invert"`
	// Digits
	IndividualDigits *bool `json:"individual_digits"`
	// Sequence (post-processors)
	Processors []json.RawMessage `json:"processors"`
}

type patternJSON struct {
	String *string `json:"String"`
	Regex  *string `json:"Regex"`
}

type specialTokenDef struct {
	ID     string   `json:"id"`
	IDs    []int    `json:"ids"`
	Tokens []string `json:"tokens"`
}

type templatePiece struct {
	sequence bool  // the input sequence ($A)
	ids      []int // a special token's ids
}

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

// Parse builds a Tokenizer from the contents of a tokenizer.json file.
func Parse(data []byte) (*Tokenizer, error) {
	var f fileJSON
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, errorf("not a tokenizer.json (not JSON or wrong shape): %v", err)
	}
	if !isNull(f.Truncation) {
		return nil, unsupported("truncation is set (only null is supported)")
	}
	if !isNull(f.Padding) {
		return nil, unsupported("padding is set (only null is supported)")
	}
	if isNull(f.Model) {
		return nil, errorf("no model")
	}
	t := &Tokenizer{unkID: -1}
	if err := t.parseModel(f.Model); err != nil {
		return nil, err
	}
	if err := t.parseAdded(f.AddedTokens); err != nil {
		return nil, err
	}
	var err error
	if t.normalizer, err = parseNormalizer(f.Normalizer, 0); err != nil {
		return nil, err
	}
	if g := growth(t.normalizer); g > maxNormalizerGrowth {
		return nil, errorf("normalizer: its Replace steps can grow a text %.3g times (a chain of replacements that each lengthen it); the limit is %d", g, maxNormalizerGrowth)
	}
	if t.preTokenizer, err = parsePreTokenizer(f.PreTokenizer, 0); err != nil {
		return nil, err
	}
	if err := t.checkCoverage(); err != nil {
		return nil, err
	}
	if err = t.parsePostProcessor(f.PostProcessor); err != nil {
		return nil, err
	}
	if t.decoder, err = parseDecoder(f.Decoder, 0); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Tokenizer) addID(id int, tok string) {
	t.idToTok[id] = tok
	if id+1 > t.vocabSz {
		t.vocabSz = id + 1
	}
}

func (t *Tokenizer) parseModel(raw json.RawMessage) error {
	var m modelJSON
	if err := json.Unmarshal(raw, &m); err != nil {
		return errorf("model: %v", err)
	}
	switch {
	case m.Type == "BPE":
	case m.Type == "" && !isNull(m.Merges):
		// Old files have no "type"; Hugging Face recognizes BPE by its merges.
	case m.Type == "":
		return errorf("model has no type")
	default:
		return unsupported("model type %q (only BPE)", m.Type)
	}
	if m.Dropout != nil && *m.Dropout != 0 {
		return unsupported("BPE dropout %v (only null or 0)", *m.Dropout)
	}
	if m.ContinuingSubwordPrefix != nil && *m.ContinuingSubwordPrefix != "" {
		return unsupported("BPE continuing_subword_prefix %q", *m.ContinuingSubwordPrefix)
	}
	if m.EndOfWordSuffix != nil && *m.EndOfWordSuffix != "" {
		return unsupported("BPE end_of_word_suffix %q", *m.EndOfWordSuffix)
	}
	if isNull(m.Vocab) {
		return errorf("model has no vocab")
	}
	if err := json.Unmarshal(m.Vocab, &t.vocab); err != nil {
		return errorf("model vocab: %v", err)
	}
	if len(t.vocab) == 0 {
		return errorf("model vocab is empty")
	}
	t.idToTok = make(map[int]string, len(t.vocab))
	for tok, id := range t.vocab {
		if id < 0 || id > math.MaxInt32-1 {
			return errorf("vocab token %q has id %d out of range", tok, id)
		}
		if other, dup := t.idToTok[id]; dup {
			a, b := other, tok
			if a > b {
				a, b = b, a
			}
			return errorf("vocab tokens %q and %q share id %d", a, b, id)
		}
		t.addID(id, tok)
	}

	if isNull(m.Merges) {
		return errorf("model has no merges")
	}
	var merges []json.RawMessage
	if err := json.Unmarshal(m.Merges, &merges); err != nil {
		return errorf("model merges: %v", err)
	}
	t.merges = make(map[uint64]mergeVal, len(merges))
	for rank, mr := range merges {
		a, b, err := parseMerge(mr)
		if err != nil {
			return errorf("merge %d: %v", rank, err)
		}
		ida, oka := t.vocab[a]
		idb, okb := t.vocab[b]
		idn, okn := t.vocab[a+b]
		switch {
		case !oka:
			return errorf("merge %d (%q %q): token %q is not in the vocab", rank, a, b, a)
		case !okb:
			return errorf("merge %d (%q %q): token %q is not in the vocab", rank, a, b, b)
		case !okn:
			return errorf("merge %d (%q %q): merged token %q is not in the vocab", rank, a, b, a+b)
		}
		// A repeated pair keeps its last rank, as Hugging Face's map does.
		t.merges[pairKey(int32(ida), int32(idb))] = mergeVal{int32(rank), int32(idn)}
	}

	t.byteFallback = m.ByteFallback
	t.fuseUnk = m.FuseUnk
	t.ignoreMerges = m.IgnoreMerges
	allBytes := true
	for b := range 256 {
		t.byteIDs[b] = -1
		if id, ok := t.vocab[fmt.Sprintf("<0x%02X>", b)]; ok {
			t.byteIDs[b] = int32(id)
		} else {
			allBytes = false
		}
	}
	if m.UnkToken != nil {
		id, ok := t.vocab[*m.UnkToken]
		if !ok {
			return errorf("unk_token %q is not in the vocab", *m.UnkToken)
		}
		t.unkID = id
	}
	t.allByteTokens = allBytes
	return nil
}

// checkCoverage errs if some text could not be encoded: without an unk token, every character
// must reach the vocabulary, through byte_fallback's <0xNN> tokens or a ByteLevel pre-tokenizer's
// 256 byte characters.
func (t *Tokenizer) checkCoverage() error {
	if t.unkID >= 0 || t.byteFallback && t.allByteTokens {
		return nil
	}
	if hasByteLevel(t.preTokenizer) {
		for b := range 256 {
			if _, ok := t.vocab[string(byteToRune[b])]; !ok {
				return errorf("the ByteLevel pre-tokenizer's character %q (byte 0x%02X) is not in the vocab, and there is no unk_token: some text could not be encoded", byteToRune[b], b)
			}
		}
		return nil
	}
	if t.byteFallback {
		return errorf("byte_fallback is on but not all 256 <0xNN> tokens are in the vocab, and there is no unk_token: some text could not be encoded")
	}
	return errorf("no unk_token and no byte_fallback: some text could not be encoded")
}

// hasByteLevel reports whether p is or contains the ByteLevel pre-tokenizer.
func hasByteLevel(p preTokenizer) bool {
	switch p := p.(type) {
	case byteLevelPre:
		return true
	case preSequence:
		return slices.ContainsFunc(p, hasByteLevel)
	}
	return false
}

// parseMerge reads one merge: "a b" or ["a", "b"].
func parseMerge(raw json.RawMessage) (string, string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		a, b, ok := strings.Cut(s, " ")
		if !ok || a == "" || b == "" || strings.Contains(b, " ") {
			return "", "", fmt.Errorf("%q is not of the form \"a b\"", s)
		}
		return a, b, nil
	}
	var pair []string
	if err := json.Unmarshal(raw, &pair); err != nil || len(pair) != 2 {
		return "", "", fmt.Errorf("%s is neither \"a b\" nor [\"a\", \"b\"]", clip(raw))
	}
	if pair[0] == "" || pair[1] == "" {
		return "", "", fmt.Errorf("%s has an empty token", clip(raw))
	}
	return pair[0], pair[1], nil
}

func clip(raw []byte) string {
	if len(raw) > 40 {
		return string(raw[:40]) + "..."
	}
	return string(raw)
}

func (t *Tokenizer) parseAdded(list []addedTokenJSON) error {
	t.added = make(map[string]int, len(list))
	t.special = make(map[int]bool)
	var raw, norm []addedToken
	for i, a := range list {
		if a.ID == nil {
			return errorf("added_tokens[%d] %q has no id", i, a.Content)
		}
		id := *a.ID
		if id < 0 || id > math.MaxInt32-1 {
			return errorf("added_tokens[%d] %q has id %d out of range", i, a.Content, id)
		}
		if a.Content == "" {
			return errorf("added_tokens[%d] (id %d) has empty content", i, id)
		}
		switch {
		case a.SingleWord:
			return unsupported("added token %q has single_word: true", a.Content)
		case a.LStrip:
			return unsupported("added token %q has lstrip: true", a.Content)
		case a.RStrip:
			return unsupported("added token %q has rstrip: true", a.Content)
		}
		if prev, dup := t.added[a.Content]; dup && prev != id {
			return errorf("added token %q has two ids, %d and %d", a.Content, prev, id)
		}
		t.added[a.Content] = id
		t.addID(id, a.Content)
		if a.Special {
			t.special[id] = true
		}
		if a.Normalized {
			norm = append(norm, addedToken{a.Content, id})
		} else {
			raw = append(raw, addedToken{a.Content, id})
		}
	}
	t.rawMatcher = newMatcher(raw)
	t.normMatcher = newMatcher(norm)
	return nil
}

func newMatcher(toks []addedToken) *matcher {
	if len(toks) == 0 {
		return nil
	}
	m := &matcher{byFirst: make(map[byte][]addedToken)}
	for _, tok := range toks {
		m.byFirst[tok.content[0]] = append(m.byFirst[tok.content[0]], tok)
	}
	for _, list := range m.byFirst {
		sort.SliceStable(list, func(i, j int) bool { return len(list[i].content) > len(list[j].content) })
	}
	return m
}

func parseComponent(raw json.RawMessage, what string) (*component, error) {
	var c component
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, errorf("%s: %v", what, err)
	}
	if c.Type == "" {
		return nil, errorf("%s has no type", what)
	}
	return &c, nil
}

func stringPattern(c *component, what string) (string, error) {
	if c.Pattern == nil {
		return "", errorf("%s Replace has no pattern", what)
	}
	if c.Pattern.Regex != nil {
		return "", unsupported("%s Replace with a Regex pattern %q (only String patterns)", what, *c.Pattern.Regex)
	}
	if c.Pattern.String == nil || *c.Pattern.String == "" {
		return "", errorf("%s Replace has an empty or missing String pattern", what)
	}
	if c.Content == nil {
		return "", errorf("%s Replace has no content", what)
	}
	return *c.Pattern.String, nil
}

// maxNormalizerGrowth bounds how many times the normalizer may lengthen a text: real files grow
// it by one (Llama-2's space→▁ is 1→3 bytes, a prefix adds a constant), a chain of
// lengthening Replace steps multiplies, and 26 chained a→aa take gigabytes to encode "a".
const maxNormalizerGrowth = 16

// growth is the most the normalizer can multiply a text's length by (a Prepend adds a constant,
// counted as nothing; NFKC's expansions are at most 18×, counted as 3, the usual worst for text).
func growth(n normalizer) float64 {
	switch n := n.(type) {
	case normSequence:
		g := 1.0
		for _, step := range n {
			g *= growth(step)
		}
		return g
	case normReplace:
		return max(1, float64(len(n.to))/float64(len(n.from)))
	case unicodeNormalizer:
		if n.form == norm.NFKC || n.form == norm.NFKD {
			return 3
		}
	}
	return 1
}

func parseNormalizer(raw json.RawMessage, depth int) (normalizer, error) {
	if isNull(raw) {
		return nil, nil
	}
	if depth > maxDepth {
		return nil, errorf("normalizer Sequences nested too deep")
	}
	c, err := parseComponent(raw, "normalizer")
	if err != nil {
		return nil, err
	}
	switch c.Type {
	case "Sequence":
		var seq normSequence
		for _, r := range c.Normalizers {
			n, err := parseNormalizer(r, depth+1)
			if err != nil {
				return nil, err
			}
			if n != nil {
				seq = append(seq, n)
			}
		}
		return seq, nil
	case "Prepend":
		if c.Prepend == nil {
			return nil, errorf("normalizer Prepend has no prepend")
		}
		return normPrepend{*c.Prepend}, nil
	case "Replace":
		from, err := stringPattern(c, "normalizer")
		if err != nil {
			return nil, err
		}
		return normReplace{from, *c.Content}, nil
	case "NFC":
		return unicodeNormalizer{norm.NFC}, nil
	case "NFD":
		return unicodeNormalizer{norm.NFD}, nil
	case "NFKC":
		return unicodeNormalizer{norm.NFKC}, nil
	case "NFKD":
		return unicodeNormalizer{norm.NFKD}, nil
	}
	return nil, unsupported("normalizer type %q (only Sequence, Prepend, Replace, NFC, NFD, NFKC and NFKD)", c.Type)
}

func parseMetaspace(c *component, what string) (metaspace, error) {
	m := metaspace{rep: '▁', scheme: prependAlways, split: true}
	if c.Replacement != nil {
		r, size := utf8.DecodeRuneInString(*c.Replacement)
		if size == 0 || size != len(*c.Replacement) {
			return m, errorf("%s Metaspace replacement %q is not one character", what, *c.Replacement)
		}
		m.rep = r
	}
	if c.AddPrefixSpace != nil && !*c.AddPrefixSpace {
		m.scheme = prependNever
	}
	if c.PrependScheme != nil {
		switch *c.PrependScheme {
		case "always":
			m.scheme = prependAlways
		case "first":
			m.scheme = prependFirst
		case "never":
			m.scheme = prependNever
		default:
			return m, errorf("%s Metaspace prepend_scheme %q (want always, first or never)", what, *c.PrependScheme)
		}
	}
	if c.Split != nil {
		m.split = *c.Split
	}
	return m, nil
}

func parsePreTokenizer(raw json.RawMessage, depth int) (preTokenizer, error) {
	if isNull(raw) {
		return nil, nil
	}
	if depth > maxDepth {
		return nil, errorf("pre_tokenizer Sequences nested too deep")
	}
	c, err := parseComponent(raw, "pre_tokenizer")
	if err != nil {
		return nil, err
	}
	switch c.Type {
	case "Sequence":
		var seq preSequence
		for _, r := range c.PreTokenizers {
			p, err := parsePreTokenizer(r, depth+1)
			if err != nil {
				return nil, err
			}
			if p != nil {
				seq = append(seq, p)
			}
		}
		if len(seq) == 0 {
			return nil, nil
		}
		return seq, nil
	case "Metaspace":
		m, err := parseMetaspace(c, "pre_tokenizer")
		if err != nil {
			return nil, err
		}
		return metaspacePre{m}, nil
	case "ByteLevel":
		b := byteLevelPre{addPrefixSpace: c.AddPrefixSpace != nil && *c.AddPrefixSpace}
		if c.UseRegex == nil || *c.UseRegex { // Hugging Face's default: GPT-2's regex
			re, err := compileSplitRegex(gpt2Pattern)
			if err != nil {
				return nil, errorf("pre_tokenizer ByteLevel: %v", err)
			}
			b.regex = &regexSplit{re: re}
		}
		return b, nil
	case "Split":
		return parseSplit(c)
	case "Digits":
		return digitsPre{individual: c.IndividualDigits != nil && *c.IndividualDigits}, nil
	}
	return nil, unsupported("pre_tokenizer type %q (only null, Metaspace, ByteLevel, Split, Digits or a Sequence of them)", c.Type)
}

// parseSplit reads a Split pre-tokenizer: a Regex or String pattern, behavior Isolated, invert
// false.
func parseSplit(c *component) (preTokenizer, error) {
	if c.Pattern == nil || (c.Pattern.Regex == nil) == (c.Pattern.String == nil) {
		return nil, errorf("pre_tokenizer Split needs a pattern with either Regex or String")
	}
	if c.Invert != nil && *c.Invert {
		return nil, unsupported("pre_tokenizer Split with invert: true")
	}
	pattern := ""
	if c.Pattern.Regex != nil {
		pattern = *c.Pattern.Regex
	} else {
		pattern = regexp2.Escape(*c.Pattern.String)
	}
	if pattern == "" {
		return nil, errorf("pre_tokenizer Split has an empty pattern")
	}
	re, err := compileSplitRegex(pattern)
	if err != nil {
		return nil, errorf("pre_tokenizer Split pattern %q: %v", clip([]byte(pattern)), err)
	}
	if c.Behavior == nil || *c.Behavior != "Isolated" {
		behavior := "none"
		if c.Behavior != nil {
			behavior = *c.Behavior
		}
		return nil, unsupported("pre_tokenizer Split behavior %q (only Isolated, which the BPE files of decoder models use)", behavior)
	}
	return regexSplit{re: re}, nil
}

func parseDecoder(raw json.RawMessage, depth int) (decoder, error) {
	if isNull(raw) {
		return nil, nil
	}
	if depth > maxDepth {
		return nil, errorf("decoder Sequences nested too deep")
	}
	c, err := parseComponent(raw, "decoder")
	if err != nil {
		return nil, err
	}
	switch c.Type {
	case "Sequence":
		var seq decSequence
		for _, r := range c.Decoders {
			d, err := parseDecoder(r, depth+1)
			if err != nil {
				return nil, err
			}
			if d != nil {
				seq = append(seq, d)
			}
		}
		return seq, nil
	case "Replace":
		from, err := stringPattern(c, "decoder")
		if err != nil {
			return nil, err
		}
		return decReplace{from, *c.Content}, nil
	case "ByteFallback":
		return decByteFallback{}, nil
	case "Fuse":
		return decFuse{}, nil
	case "Strip":
		if c.Content == nil || utf8.RuneCountInString(*c.Content) != 1 {
			return nil, errorf("decoder Strip content must be one character")
		}
		d := decStrip{}
		d.content, _ = utf8.DecodeRuneInString(*c.Content)
		if c.Start != nil {
			d.start = *c.Start
		}
		if c.Stop != nil {
			d.stop = *c.Stop
		}
		if d.start < 0 || d.stop < 0 {
			return nil, errorf("decoder Strip start/stop must not be negative")
		}
		return d, nil
	case "Metaspace":
		m, err := parseMetaspace(c, "decoder")
		if err != nil {
			return nil, err
		}
		return metaspaceDec{m}, nil
	case "ByteLevel":
		return byteLevelDec{}, nil
	}
	return nil, unsupported("decoder type %q (only Sequence, Replace, ByteFallback, Fuse, Strip, Metaspace and ByteLevel)", c.Type)
}

func (t *Tokenizer) parsePostProcessor(raw json.RawMessage) error {
	if isNull(raw) {
		return nil
	}
	c, err := parseComponent(raw, "post_processor")
	if err != nil {
		return err
	}
	switch c.Type {
	case "ByteLevel": // it only adjusts offsets, which Encode does not return
		return nil
	case "Sequence":
		for _, r := range c.Processors {
			if err := t.parsePostProcessor(r); err != nil {
				return err
			}
		}
		return nil
	case "TemplateProcessing":
	default:
		return unsupported("post_processor type %q (only null, ByteLevel, TemplateProcessing or a Sequence of them)", c.Type)
	}
	if t.hasTemplate {
		return unsupported("post_processor with two TemplateProcessing steps")
	}
	pieces, err := parseTemplate(c.Single)
	if err != nil {
		return err
	}
	for _, p := range pieces {
		if p.sequence {
			t.template = append(t.template, templatePiece{sequence: true})
			continue
		}
		def, ok := c.SpecialTokens[p.special]
		if !ok {
			return errorf("post_processor template uses special token %q that is not in its special_tokens", p.special)
		}
		if len(def.IDs) == 0 {
			return errorf("post_processor special token %q has no ids", p.special)
		}
		for _, id := range def.IDs {
			if _, ok := t.idToTok[id]; !ok {
				return errorf("post_processor special token %q has id %d that is not in the vocab", p.special, id)
			}
		}
		t.template = append(t.template, templatePiece{ids: def.IDs})
	}
	t.hasTemplate = true
	return nil
}

type rawPiece struct {
	sequence bool
	special  string
}

// parseTemplate reads a TemplateProcessing "single" template: a list of
// {"SpecialToken": {"id": ...}} / {"Sequence": {"id": "A"}} objects, or the
// string form ("<s> $A", "$A:0 </s>:0").
func parseTemplate(raw json.RawMessage) ([]rawPiece, error) {
	if isNull(raw) {
		return nil, errorf("post_processor TemplateProcessing has no single template")
	}
	var pieces []rawPiece
	var words []string
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		words = strings.Fields(s)
	} else if err := json.Unmarshal(raw, &words); err != nil {
		var objs []struct {
			SpecialToken *struct {
				ID string `json:"id"`
			} `json:"SpecialToken"`
			Sequence *struct {
				ID string `json:"id"`
			} `json:"Sequence"`
		}
		if err := json.Unmarshal(raw, &objs); err != nil {
			return nil, errorf("post_processor single template: %v", err)
		}
		for i, o := range objs {
			switch {
			case o.Sequence != nil && o.SpecialToken == nil:
				if o.Sequence.ID != "A" {
					return nil, errorf("post_processor single template uses sequence %q (only A)", o.Sequence.ID)
				}
				pieces = append(pieces, rawPiece{sequence: true})
			case o.SpecialToken != nil && o.Sequence == nil:
				pieces = append(pieces, rawPiece{special: o.SpecialToken.ID})
			default:
				return nil, errorf("post_processor single template piece %d is neither a SpecialToken nor a Sequence", i)
			}
		}
		return pieces, nil
	}
	for _, w := range words {
		if i := strings.LastIndexByte(w, ':'); i > 0 && allDigits(w[i+1:]) {
			w = w[:i] // drop the type id
		}
		switch {
		case w == "$A" || w == "$":
			pieces = append(pieces, rawPiece{sequence: true})
		case strings.HasPrefix(w, "$"):
			return nil, errorf("post_processor single template uses sequence %q (only $A)", w)
		default:
			pieces = append(pieces, rawPiece{special: w})
		}
	}
	return pieces, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}
