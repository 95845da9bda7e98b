package tokenizer

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// normalizer is one of the supported tokenizer.json normalizers.
type normalizer interface {
	normalize(s string) string
}

type normSequence []normalizer

func (q normSequence) normalize(s string) string {
	for _, n := range q {
		s = n.normalize(s)
	}
	return s
}

// normPrepend is Hugging Face's Prepend: it prepends to non-empty text only.
type normPrepend struct{ prefix string }

func (p normPrepend) normalize(s string) string {
	if s == "" {
		return s
	}
	return p.prefix + s
}

// normReplace is Replace with a {"String": ...} pattern.
type normReplace struct{ from, to string }

func (r normReplace) normalize(s string) string { return strings.ReplaceAll(s, r.from, r.to) }

// preTokenizer is one of the supported pre-tokenizers. first tells whether the
// text starts at offset 0 of the input (for Metaspace's prepend_scheme "first").
type preTokenizer interface {
	split(s string, first bool) []string
}

type preSequence []preTokenizer

func (q preSequence) split(s string, first bool) []string {
	words := []string{s}
	for _, p := range q {
		var next []string
		for i, w := range words {
			next = append(next, p.split(w, first && i == 0)...)
		}
		words = next
	}
	return words
}

type prependScheme int

const (
	prependAlways prependScheme = iota
	prependFirst
	prependNever
)

// metaspace is the Metaspace pre-tokenizer and decoder: spaces become the
// replacement character, which is prepended (unless the text already starts
// with it) according to the scheme; with split, the text is cut before each
// replacement character (Hugging Face's MergedWithNext).
type metaspace struct {
	rep    rune
	scheme prependScheme
	split  bool
}

func (m metaspace) prepend(s string, first bool) bool {
	switch m.scheme {
	case prependAlways:
		return true
	case prependFirst:
		return first
	}
	return false
}

func (m metaspace) splitWords(s string, first bool) []string {
	rep := string(m.rep)
	s = strings.ReplaceAll(s, " ", rep)
	if s != "" && m.prepend(s, first) && !strings.HasPrefix(s, rep) {
		s = rep + s
	}
	if !m.split || s == "" {
		return []string{s}
	}
	var out []string
	last := 0
	for i, r := range s {
		if r == m.rep && i > last {
			out = append(out, s[last:i])
			last = i
		}
	}
	return append(out, s[last:])
}

type metaspacePre struct{ metaspace }

func (m metaspacePre) split(s string, first bool) []string { return m.splitWords(s, first) }

// decoder is one of the supported decoders; it works on the token strings
// like Hugging Face's decode_chain.
type decoder interface {
	decode(toks []string) []string
}

type decSequence []decoder

func (q decSequence) decode(toks []string) []string {
	for _, d := range q {
		toks = d.decode(toks)
	}
	return toks
}

type decReplace struct{ from, to string }

func (r decReplace) decode(toks []string) []string {
	for i, t := range toks {
		toks[i] = strings.ReplaceAll(t, r.from, r.to)
	}
	return toks
}

// decByteFallback turns runs of <0xNN> tokens into the string of their bytes;
// a run that is not valid UTF-8 becomes one U+FFFD per byte (as Hugging Face).
type decByteFallback struct{}

func byteToken(t string) (byte, bool) {
	if len(t) != 6 || !strings.HasPrefix(t, "<0x") || t[5] != '>' {
		return 0, false
	}
	v, err := strconv.ParseUint(t[3:5], 16, 8)
	if err != nil {
		return 0, false
	}
	return byte(v), true
}

func (decByteFallback) decode(toks []string) []string {
	out := make([]string, 0, len(toks))
	var pending []byte
	flush := func() {
		if len(pending) == 0 {
			return
		}
		if utf8.Valid(pending) {
			out = append(out, string(pending))
		} else {
			for range pending {
				out = append(out, "\uFFFD")
			}
		}
		pending = pending[:0]
	}
	for _, t := range toks {
		if b, ok := byteToken(t); ok {
			pending = append(pending, b)
			continue
		}
		flush()
		out = append(out, t)
	}
	flush()
	return out
}

type decFuse struct{}

func (decFuse) decode(toks []string) []string {
	if len(toks) == 0 {
		return toks
	}
	return []string{strings.Join(toks, "")}
}

// decStrip removes up to start copies of content from the front of each token
// and up to stop from its end.
type decStrip struct {
	content     rune
	start, stop int
}

func (s decStrip) decode(toks []string) []string {
	for i, t := range toks {
		for n := 0; n < s.start; n++ {
			r, size := utf8.DecodeRuneInString(t)
			if size == 0 || r != s.content {
				break
			}
			t = t[size:]
		}
		for n := 0; n < s.stop; n++ {
			r, size := utf8.DecodeLastRuneInString(t)
			if size == 0 || r != s.content {
				break
			}
			t = t[:len(t)-size]
		}
		toks[i] = t
	}
	return toks
}

// metaspaceDec is the Metaspace decoder: the replacement character becomes a
// space, except in the first token when a prefix is prepended, where it is
// dropped (Hugging Face's behaviour).
type metaspaceDec struct{ metaspace }

func (m metaspaceDec) decode(toks []string) []string {
	for i, t := range toks {
		with := " "
		if i == 0 && m.scheme != prependNever {
			with = ""
		}
		toks[i] = strings.ReplaceAll(t, string(m.rep), with)
	}
	return toks
}
