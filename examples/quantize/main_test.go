package main

import (
	"bytes"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/bnb"
	"peft/peft/generate"
	"peft/peft/llama"
	"peft/peft/safetensors"
	"peft/peft/stories260k"
	"peft/qlora"
)

// storiesFile writes the embedded stories260K weights to a file and returns its path.
func storiesFile(t *testing.T) string {
	t.Helper()
	data, err := fs.ReadFile(stories260k.FS(), "model.safetensors")
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "model.safetensors")
	require.NoError(t, os.WriteFile(path, data, 0o644))
	return path
}

// On stories260K: every 2-D F32 *.weight tensor (the embedding, the 35 projections and the file's
// copy of the tied head) is written in the 4-bit layout, the norms are copied; loading the result
// through the SDK gives exactly the host dequantization of each weight, and the model runs.
func TestQuantizeStories(t *testing.T) {
	for _, opts := range []bnb.Options{bnb.DefaultOptions(), {Type: bnb.FP4, BlockSize: 128}} {
		t.Run(string(opts.Type), func(t *testing.T) {
			in := storiesFile(t)
			out := filepath.Join(t.TempDir(), "nf4.safetensors")
			var log bytes.Buffer
			require.NoError(t, run(in, out, opts, &log))
			t.Log(strings.TrimSpace(log.String()))
			require.Contains(t, log.String(), "quantized 37 tensors")

			original, err := safetensors.Read(in)
			require.NoError(t, err)
			written, err := safetensors.Read(out)
			require.NoError(t, err)
			require.Equal(t, original.Metadata, written.Metadata)
			names := bnb.QuantizedNames(written)
			require.Len(t, names, 37)
			for _, tensor := range original.Tensors {
				if len(tensor.Shape) != 2 {
					copied, ok := written.Get(tensor.Name)
					require.True(t, ok, tensor.Name)
					require.Equal(t, tensor.Data, copied.Data, "%s is copied unchanged", tensor.Name)
				}
			}

			// Load through the SDK: a Llama folder with the quantized file as its weights.
			config, err := fs.ReadFile(stories260k.FS(), "config.json")
			require.NoError(t, err)
			data, err := os.ReadFile(out)
			require.NoError(t, err)
			ctx := context.New()
			dequantized, pre, err := qlora.Dequantized(fstest.MapFS{
				"config.json":       &fstest.MapFile{Data: config},
				"model.safetensors": &fstest.MapFile{Data: data},
			})
			require.NoError(t, err)
			cfg, err := llama.LoadPretrainedFS(ctx, dequantized)
			require.NoError(t, err)
			require.Len(t, pre, 37)
			b, err := backend.Get()
			require.NoError(t, err)
			m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, shapes.Make(dtypes.Int32, 1, 8))
			require.NoError(t, err)
			for _, tensor := range original.Tensors {
				if len(tensor.Shape) != 2 || tensor.Name == "lm_head.weight" { // tied: the loader checks it equals the embedding
					continue
				}
				values, err := tensor.Float32s()
				require.NoError(t, err)
				q, err := bnb.Quantize(values, tensor.Shape, opts)
				require.NoError(t, err)
				want := q.Dequantize() // [out, in], or the embedding's [vocab, dim]
				got := loadedWeights(t, m, tensor.Name)
				require.Len(t, got, len(want), tensor.Name)
				for i := range want {
					require.Equal(t, math.Float32bits(want[i]), math.Float32bits(got[i]), "%s value %d", tensor.Name, i)
				}
			}
			nll, err := generate.MeanNLL(m, goldenIDs(t))
			require.NoError(t, err)
			t.Logf("golden mean NLL with every weight in 4 bits: %.4f (float32: 0.3973)", nll)
			require.Greater(t, nll, 0.3973)
			require.Less(t, nll, 1.0)
		})
	}
}

// loadedWeights returns a loaded variable's values in Hugging Face's layout ([out, in] for
// linear weights).
func loadedWeights(t *testing.T, m *peft.Model, name string) []float32 {
	t.Helper()
	path := strings.TrimSuffix(name, ".weight")
	if layer := m.Layout().Linear(path); layer != nil {
		w, err := peft.Float32s(layer.Weights(m.Context()))
		require.NoError(t, err)
		out := make([]float32, len(w))
		for i := range layer.In {
			for o := range layer.Out {
				out[o*layer.In+i] = w[i*layer.Out+o]
			}
		}
		return out
	}
	for _, e := range m.Layout().Embeddings {
		if e.Path == path {
			w, err := peft.Float32s(e.Table(m.Context()))
			require.NoError(t, err)
			return w
		}
	}
	t.Fatalf("no variable for %s", name)
	return nil
}

func goldenIDs(t *testing.T) []int {
	t.Helper()
	ids, err := stories260k.GoldenSequence()
	require.NoError(t, err)
	return ids
}

// Bad input is a clear error and leaves the output as it was (absent, or its old content).
func TestBadInput(t *testing.T) {
	in := storiesFile(t)
	garbage := filepath.Join(t.TempDir(), "garbage.safetensors")
	require.NoError(t, os.WriteFile(garbage, []byte("not a safetensors file"), 0o644))
	nonFinite := filepath.Join(t.TempDir(), "nan.safetensors")
	require.NoError(t, safetensors.Write(nonFinite, []safetensors.Tensor{
		safetensors.FromFloat32("a.weight", []int{2, 32}, make([]float32, 64)),
		safetensors.FromFloat32("b.weight", []int{1, 2}, []float32{1, float32(math.NaN())}),
	}, nil))
	for _, tc := range []struct {
		name string
		in   string
		opts bnb.Options
		want string
	}{
		{"block size not a power of two", in, bnb.Options{Type: bnb.NF4, BlockSize: 100, DoubleQuant: true}, "blocksize must be a power of two from 32 to 4096, got 100"},
		{"block size too large", in, bnb.Options{Type: bnb.NF4, BlockSize: 8192}, "got 8192"},
		{"unknown type", in, bnb.Options{Type: "int4", BlockSize: 64}, `unknown quant type "int4"`},
		{"missing input", filepath.Join(t.TempDir(), "missing.safetensors"), bnb.DefaultOptions(), "no such file"},
		{"not safetensors", garbage, bnb.DefaultOptions(), "safetensors"},
		{"non-finite value", nonFinite, bnb.DefaultOptions(), "b.weight: bnb: value 1 is NaN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			out := filepath.Join(dir, "out.safetensors")
			err := run(tc.in, out, tc.opts, &bytes.Buffer{})
			require.ErrorContains(t, err, tc.want)
			require.NoFileExists(t, out)
			existing := filepath.Join(dir, "existing.safetensors")
			require.NoError(t, os.WriteFile(existing, []byte("old"), 0o644))
			require.Error(t, run(tc.in, existing, tc.opts, &bytes.Buffer{}))
			data, err := os.ReadFile(existing)
			require.NoError(t, err)
			require.Equal(t, "old", string(data))
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			require.Len(t, entries, 1, "no temporary file is left behind")
		})
	}
}
