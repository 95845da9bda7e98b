package safetensors

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// fuzzSeeds returns valid encodings used as fuzzing seeds.
func fuzzSeeds(tb testing.TB) [][]byte {
	tb.Helper()
	sets := []struct {
		tensors []Tensor
		md      map[string]string
	}{
		{sampleTensors(), map[string]string{"format": "pt"}},
		{[]Tensor{FromFloat32("base_model.model.q_proj.lora_A.weight", []int{2, 2}, []float32{1, 2, 3, 4})}, nil},
		{[]Tensor{{Name: "s", DType: BF16, Shape: []int{}, Data: []byte{0x80, 0x3f}}, {Name: "z", DType: I32, Shape: []int{0}}}, nil},
		{nil, map[string]string{"only": "metadata"}},
	}
	var seeds [][]byte
	for _, s := range sets {
		enc, err := Encode(s.tensors, s.md)
		if err != nil {
			tb.Fatal(err)
		}
		seeds = append(seeds, enc)
	}
	return seeds
}

// FuzzParse checks that Parse never panics and that whatever it accepts
// re-encodes into an encoding that parses to the same tensors and metadata.
// The checked-in corpus is in testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	for _, seed := range fuzzSeeds(f) {
		f.Add(seed)
		f.Add(seed[:len(seed)-1])        // truncated data section
		f.Add(seed[:len(seed)/2])        // truncated header or data
		f.Add(seed[:8])                  // length prefix only
		f.Add(seed[:min(12, len(seed))]) // a few header bytes
	}
	f.Add([]byte{})
	f.Add([]byte("\x02\x00\x00\x00\x00\x00\x00\x00{}"))
	f.Add(withHeader(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, make([]byte, 8)))

	f.Fuzz(func(t *testing.T, data []byte) {
		orig := bytes.Clone(data)
		file, err := Parse(data)
		if !bytes.Equal(orig, data) {
			t.Fatal("Parse modified its input")
		}
		if err != nil {
			if file != nil {
				t.Fatal("non-nil file with an error")
			}
			return
		}
		enc, err := Encode(file.Tensors, file.Metadata)
		if err != nil {
			t.Fatalf("parsed file does not re-encode: %v", err)
		}
		again, err := Parse(enc)
		if err != nil {
			t.Fatalf("re-encoded file does not parse: %v", err)
		}
		if len(again.Tensors) != len(file.Tensors) {
			t.Fatalf("tensor count %d, then %d", len(file.Tensors), len(again.Tensors))
		}
		for _, want := range file.Tensors {
			got, ok := again.Get(want.Name)
			if !ok {
				t.Fatalf("tensor %q lost", want.Name)
			}
			if got.DType != want.DType || !slices.Equal(got.Shape, want.Shape) || !bytes.Equal(got.Data, want.Data) {
				t.Fatalf("tensor %q changed: %s%v → %s%v", want.Name, want.DType, want.Shape, got.DType, got.Shape)
			}
			if _, err := want.NumElements(); err != nil {
				t.Fatalf("accepted tensor %q has a bad shape: %v", want.Name, err)
			}
		}
		if len(again.Metadata) != len(file.Metadata) {
			t.Fatalf("metadata %v, then %v", file.Metadata, again.Metadata)
		}
		for k, v := range file.Metadata {
			if again.Metadata[k] != v {
				t.Fatalf("metadata %q: %q, then %q", k, v, again.Metadata[k])
			}
		}
		// Encoding is canonical: a second round gives the same bytes.
		enc2, err := Encode(again.Tensors, again.Metadata)
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding is not stable (err %v)", err)
		}
		// Converting never panics either.
		for i := range file.Tensors {
			_, _ = file.Tensors[i].Float32s()
		}
	})
}

// TestFuzzCorpusFiles pins what the checked-in corpus entries exercise: the
// valid ones must parse (so the fuzz target's round trip runs on them), the
// others must be rejected.
func TestFuzzCorpusFiles(t *testing.T) {
	valid := map[string]bool{"valid_lora": true, "scalar_f16_and_empty": true}
	entries, err := os.ReadDir(filepath.Join("testdata", "fuzz", "FuzzParse"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) < 3 {
		t.Fatalf("only %d corpus files", len(entries))
	}
	for _, e := range entries {
		raw, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzParse", e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(raw)), "\n")
		if len(lines) != 2 || lines[0] != "go test fuzz v1" ||
			!strings.HasPrefix(lines[1], "[]byte(") || !strings.HasSuffix(lines[1], ")") {
			t.Fatalf("%s: not a go fuzz corpus file", e.Name())
		}
		s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		_, err = Parse([]byte(s))
		if valid[e.Name()] && err != nil {
			t.Errorf("%s: want valid, got %v", e.Name(), err)
		}
		if !valid[e.Name()] && err == nil {
			t.Errorf("%s: want an error", e.Name())
		}
	}
}
