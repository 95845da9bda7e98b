package tokenizer

import (
	"io/fs"
	"testing"
	"unicode/utf8"

	"peft/peft/stories260k"
)

// FuzzParse checks that Parse never panics, and that a tokenizer it accepts
// can encode and decode without panicking.
func FuzzParse(f *testing.F) {
	data, err := fs.ReadFile(stories260k.FS(), "tokenizer.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	for _, n := range []int{0, 1, 100, 700, 1500, 5000, len(data) / 2, len(data) - 200, len(data) - 1} {
		f.Add(data[:n])
	}
	for _, s := range []string{
		`{}`,
		`null`,
		`{"model":null}`,
		`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"<unk>":3},"merges":["a b"],"unk_token":"<unk>"}}`,
		`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"<unk>":3},"merges":[["a","b"]],"unk_token":"<unk>","fuse_unk":true,"ignore_merges":true},` +
			`"added_tokens":[{"id":3,"content":"<unk>","special":true},{"id":7,"content":"ZZ","normalized":true}],` +
			`"normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"_"},{"type":"Replace","pattern":{"String":" "},"content":"_"}]},` +
			`"pre_tokenizer":{"type":"Metaspace","replacement":"_","prepend_scheme":"first","split":true},` +
			`"post_processor":{"type":"TemplateProcessing","single":"<unk> $A","special_tokens":{"<unk>":{"id":"<unk>","ids":[3],"tokens":["<unk>"]}}},` +
			`"decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"_"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":1}]}}`,
		`{"model":{"type":"BPE","vocab":{"a":0},"merges":["a a"]}}`,
		`{"model":{"type":"WordPiece","vocab":{"a":0}}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		tk, err := Parse(data)
		if err != nil {
			if tk != nil {
				t.Fatal("non-nil tokenizer with an error")
			}
			return
		}
		// Chains of Replace steps can grow text exponentially; keep the
		// exercise small for such files.
		if steps(tk) > 8 {
			return
		}
		for _, s := range []string{"", "a b", " ab\n🙂中 <s></s>", "\xff"} {
			ids := tk.Encode(s)
			for _, id := range ids {
				if _, ok := tk.idToTok[id]; !ok {
					t.Fatalf("Encode(%q) gave unknown id %d", s, id)
				}
			}
			out := tk.Decode(ids, false)
			if !utf8.ValidString(out) {
				t.Fatalf("Decode gave invalid UTF-8 %q", out)
			}
			tk.Decode(ids, true)
		}
		tk.Decode([]int{-1, 0, 1, 2, 3, 1 << 40}, true)
		tk.VocabSize()
		tk.BOS()
		tk.EOS()
	})
}

// steps counts the normalizer, pre-tokenizer and decoder steps.
func steps(tk *Tokenizer) int {
	n := 0
	var countN func(normalizer)
	countN = func(x normalizer) {
		if q, ok := x.(normSequence); ok {
			for _, y := range q {
				countN(y)
			}
			return
		}
		n++
	}
	var countD func(decoder)
	countD = func(x decoder) {
		if q, ok := x.(decSequence); ok {
			for _, y := range q {
				countD(y)
			}
			return
		}
		n++
	}
	var countP func(preTokenizer)
	countP = func(x preTokenizer) {
		if q, ok := x.(preSequence); ok {
			for _, y := range q {
				countP(y)
			}
			return
		}
		n++
	}
	if tk.normalizer != nil {
		countN(tk.normalizer)
	}
	if tk.decoder != nil {
		countD(tk.decoder)
	}
	if tk.preTokenizer != nil {
		countP(tk.preTokenizer)
	}
	return n
}
