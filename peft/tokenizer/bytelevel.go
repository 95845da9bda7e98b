package tokenizer

import (
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
	"golang.org/x/text/unicode/norm"
)

// Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2): the text's UTF-8 bytes are mapped one for
// one to printable characters (GPT-2's bytes_to_unicode) before BPE, so every byte is in the
// vocabulary and nothing needs a byte fallback; the decoder maps them back.

// byteToRune is GPT-2's bytes_to_unicode: the printable bytes '!'…'~', '¡'…'¬' and '®'…'ÿ' map
// to themselves, the others to U+0100 and up in byte order.
var byteToRune [256]rune

// runeToByte inverts byteToRune.
var runeToByte = make(map[rune]byte, 256)

func init() {
	next := rune(256)
	for b := range 256 {
		switch {
		case b >= '!' && b <= '~', b >= 0xA1 && b <= 0xAC, b >= 0xAE && b <= 0xFF:
			byteToRune[b] = rune(b)
		default:
			byteToRune[b] = next
			next++
		}
		runeToByte[byteToRune[b]] = byte(b)
	}
}

// byteLevelString maps each byte of s to its byte-level character.
func byteLevelString(s string) string {
	var b strings.Builder
	b.Grow(2 * len(s))
	for i := 0; i < len(s); i++ {
		b.WriteRune(byteToRune[s[i]])
	}
	return b.String()
}

// gpt2Pattern is the regex ByteLevel's use_regex splits with (GPT-2's).
const gpt2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

// compileSplitRegex compiles a tokenizer.json Split or ByteLevel regex. Hugging Face runs them
// with Oniguruma; regexp2 has what their patterns use and Go's regexp lacks (lookahead such as
// \s+(?!\S)), with the same Unicode classes (\s, \p{L}, \p{N}).
func compileSplitRegex(pattern string) (*regexp2.Regexp, error) {
	return regexp2.Compile(pattern, regexp2.Unicode)
}

// regexSplit is the Split pre-tokenizer with a regex (or escaped string) pattern and the behavior
// the real files use, Isolated: the matches and the text between them are the pieces.
type regexSplit struct {
	re *regexp2.Regexp
}

// split cuts s at the pattern's matches, in Hugging Face's Split semantics (Isolated, invert
// false). Empty matches cut nothing.
func (p regexSplit) split(s string, _ bool) []string {
	runes := []rune(s)
	var out []string
	last := 0
	m, err := p.re.FindRunesMatch(runes)
	for err == nil && m != nil {
		if m.Length > 0 {
			if m.Index > last {
				out = append(out, string(runes[last:m.Index]))
			}
			out = append(out, string(runes[m.Index:m.Index+m.Length]))
			last = m.Index + m.Length
		}
		m, err = p.re.FindNextMatch(m)
	}
	if last < len(runes) {
		out = append(out, string(runes[last:]))
	}
	return out
}

// byteLevelPre is the ByteLevel pre-tokenizer: optionally a leading space, optionally GPT-2's
// regex split, then each byte to its byte-level character.
type byteLevelPre struct {
	addPrefixSpace bool
	regex          *regexSplit // nil without use_regex
}

func (b byteLevelPre) split(s string, _ bool) []string {
	if b.addPrefixSpace && !strings.HasPrefix(s, " ") {
		s = " " + s
	}
	pieces := []string{s}
	if b.regex != nil {
		pieces = b.regex.split(s, false)
	}
	for i, p := range pieces {
		pieces[i] = byteLevelString(p)
	}
	return pieces
}

// digitsPre is the Digits pre-tokenizer: numeric characters (Rust's char::is_numeric, Unicode's
// N categories) are cut from the rest, each alone with individual_digits, else in runs.
type digitsPre struct{ individual bool }

func (d digitsPre) split(s string, _ bool) []string {
	var out []string
	start, prevDigit := 0, false
	for i, r := range s {
		digit := unicode.IsNumber(r)
		if i > start && (digit != prevDigit || digit && d.individual) {
			out = append(out, s[start:i])
			start = i
		}
		prevDigit = digit
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

// unicodeNormalizer is one of NFC, NFD, NFKC, NFKD.
type unicodeNormalizer struct{ form norm.Form }

func (u unicodeNormalizer) normalize(s string) string { return u.form.String(s) }

// byteLevelDec is the ByteLevel decoder: each token's byte-level characters back to bytes (a
// token with another character, such as an added token, keeps its own bytes), the whole read as
// UTF-8 with invalid sequences replaced as Rust's from_utf8_lossy does.
type byteLevelDec struct{}

func (byteLevelDec) decode(toks []string) []string {
	var raw []byte
	for _, t := range toks {
		start := len(raw)
		ok := true
		for _, r := range t {
			b, found := runeToByte[r]
			if !found {
				ok = false
				break
			}
			raw = append(raw, b)
		}
		if !ok {
			raw = append(raw[:start], t...)
		}
	}
	return []string{lossyUTF8(raw)}
}

// lossyUTF8 is Rust's String::from_utf8_lossy: each maximal prefix of an ill-formed sequence
// (Unicode's "substitution of maximal subparts") becomes one U+FFFD.
func lossyUTF8(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var out strings.Builder
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if r != utf8.RuneError || size > 1 {
			out.WriteRune(r)
			i += size
			continue
		}
		out.WriteRune(utf8.RuneError)
		i += maximalSubpart(b[i:])
	}
	return out.String()
}

// maximalSubpart is the length of the longest prefix of b that starts a well-formed UTF-8
// sequence without completing it (at least 1): the bytes one U+FFFD replaces.
func maximalSubpart(b []byte) int {
	lead := b[0]
	var n int
	lo, hi := byte(0x80), byte(0xBF)
	switch {
	case lead >= 0xC2 && lead <= 0xDF:
		n = 2
	case lead == 0xE0:
		n, lo = 3, 0xA0
	case lead >= 0xE1 && lead <= 0xEC, lead == 0xEE, lead == 0xEF:
		n = 3
	case lead == 0xED:
		n, hi = 3, 0x9F
	case lead == 0xF0:
		n, lo = 4, 0x90
	case lead >= 0xF1 && lead <= 0xF3:
		n = 4
	case lead == 0xF4:
		n, hi = 4, 0x8F
	default:
		return 1
	}
	i := 1
	for ; i < n && i < len(b); i++ {
		c := b[i]
		if i == 1 && (c < lo || c > hi) || i > 1 && (c < 0x80 || c > 0xBF) {
			break
		}
	}
	return i
}
