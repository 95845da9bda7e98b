package llama_test

import (
	"encoding/json"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/backends/simplego"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/backend/goexec"
	"peft/peft/blas"
	"peft/peft/llama"
	"peft/peft/safetensors"
	"peft/peft/stories260k"
)

// golden is what golden.json holds, computed by an independent implementation in float64.
type golden struct {
	Bos struct {
		InputIDs   []int32   `json:"input_ids"`
		LogitsPos0 []float64 `json:"logits_pos0"`
		LogitsPos1 []float64 `json:"logits_pos1"`
	} `json:"bos"`
	Prompt struct {
		InputIDs   []int32   `json:"input_ids"`
		LastLogits []float64 `json:"last_logits"`
	} `json:"prompt"`
	Loss struct {
		InputIDs    []int32   `json:"input_ids"`
		TargetIDs   []int32   `json:"target_ids"`
		Mean        float64   `json:"mean_cross_entropy"`
		PerTokenNLL []float64 `json:"per_token_nll"`
	} `json:"loss"`
}

func readGolden(t *testing.T) golden {
	t.Helper()
	data, err := fs.ReadFile(stories260k.FS(), "golden.json")
	require.NoError(t, err)
	var g golden
	require.NoError(t, json.Unmarshal(data, &g))
	return g
}

func loadStories(t *testing.T) (llama.Config, *peft.Model) {
	t.Helper()
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, stories260k.FS())
	require.NoError(t, err)
	b, err := backend.Get()
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), nil, shapes.Make(dtypes.Int32, 1, 2))
	require.NoError(t, err)
	return cfg, m
}

func logitsOf(t *testing.T, m *peft.Model, ids []int32) [][]float32 {
	t.Helper()
	out, err := m.Call(tensors.FromValue([][]int32{ids}))
	require.NoError(t, err)
	return out[0].Value().([][][]float32)[0]
}

func requireClose(t *testing.T, want []float64, got []float32, tol float64, what string) {
	t.Helper()
	require.Len(t, got, len(want), what)
	for i := range want {
		require.InDelta(t, want[i], float64(got[i]), tol, "%s[%d]", what, i)
	}
}

func TestStories260KConfig(t *testing.T) {
	cfg, m := loadStories(t)
	one := 1
	require.Equal(t, llama.Config{VocabSize: 512, HiddenSize: 64, IntermediateSize: 172, NumLayers: 5, NumHeads: 8,
		NumKVHeads: 4, MaxPositions: 512, RMSNormEps: 1e-5, RopeTheta: 10000, TieEmbeddings: true,
		BOSTokenID: &one, EOSTokenIDs: llama.TokenIDs{2}, ModelType: "llama"}, cfg)
	require.EqualValues(t, 260_032, m.Report().All, "the README's parameter count")
}

// Logits at positions 0 and 1 of [BOS, 403] match golden.json within 1e-4.
func TestStories260KGoldenLogits(t *testing.T) {
	g := readGolden(t)
	_, m := loadStories(t)
	logits := logitsOf(t, m, g.Bos.InputIDs)
	requireClose(t, g.Bos.LogitsPos0, logits[0], 1e-4, "logits_pos0")
	requireClose(t, g.Bos.LogitsPos1, logits[1], 1e-4, "logits_pos1")
	prompt := logitsOf(t, m, g.Prompt.InputIDs)
	requireClose(t, g.Prompt.LastLogits, prompt[len(prompt)-1], 1e-4, "prompt last_logits")
}

// The mean next-token loss over the golden sequence equals golden.json's within 1e-4, through
// peft.NextTokenLoss (the loss the trainer uses) and per token.
func TestStories260KGoldenLoss(t *testing.T) {
	g := readGolden(t)
	_, m := loadStories(t)
	logits := logitsOf(t, m, g.Loss.InputIDs)
	var sum float64
	for pos, target := range g.Loss.TargetIDs {
		row := logits[pos]
		maxLogit := math.Inf(-1)
		for _, v := range row {
			maxLogit = math.Max(maxLogit, float64(v))
		}
		var z float64
		for _, v := range row {
			z += math.Exp(float64(v) - maxLogit)
		}
		nll := maxLogit + math.Log(z) - float64(row[target])
		require.InDelta(t, g.Loss.PerTokenNLL[pos], nll, 1e-4, "token %d", pos)
		sum += nll
	}
	require.InDelta(t, 0.39728868731037015, sum/float64(len(g.Loss.TargetIDs)), 1e-4)
	require.InDelta(t, g.Loss.Mean, 0.39728868731037015, 1e-12)

	// The same through the trainer's loss: the sequence with BOS, every next token scored.
	sequence := tensors.FromValue([][]int32{append(append([]int32{}, g.Loss.InputIDs...), g.Loss.TargetIDs[len(g.Loss.TargetIDs)-1])})
	out, err := m.Call(sequence)
	require.NoError(t, err)
	b, err := backend.Get()
	require.NoError(t, err)
	loss, err := graph.ExecOnce(b, func(logits, ids *graph.Node) *graph.Node {
		return peft.NextTokenLoss([]*graph.Node{ids}, []*graph.Node{logits})
	}, out[0], sequence)
	require.NoError(t, err)
	require.InDelta(t, 0.39728868731037015, float64(loss.Value().(float32)), 1e-4)
}

// A merged-out folder written by SaveHF loads back to the same logits.
func TestSaveHFRoundTrip(t *testing.T) {
	cfg, m := loadStories(t)
	dir := t.TempDir()
	require.NoError(t, llama.SaveHF(dir, cfg, m.Context(), stories260k.FS(), "tokenizer.json", "tokenizer_config.json"))
	for _, name := range []string{"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} {
		_, err := os.Stat(filepath.Join(dir, name))
		require.NoError(t, err, name)
	}
	// Hugging Face layout: [out, in] under Hugging Face names.
	f, err := safetensors.Read(filepath.Join(dir, "model.safetensors"))
	require.NoError(t, err)
	q, ok := f.Get("model.layers.0.self_attn.k_proj.weight")
	require.True(t, ok)
	require.Equal(t, []int{32, 64}, q.Shape)
	orig, err := fs.ReadFile(stories260k.FS(), "model.safetensors")
	require.NoError(t, err)
	origFile, err := safetensors.Parse(orig)
	require.NoError(t, err)
	want, _ := origFile.Get("model.layers.0.self_attn.k_proj.weight")
	require.Equal(t, want.Data, q.Data, "weights written back bit for bit")

	ctx := context.New()
	cfg2, err := llama.LoadPretrained(ctx, dir)
	require.NoError(t, err)
	require.Equal(t, cfg, cfg2)
	b, _ := backend.Get()
	m2, err := peft.NewModel(b, ctx, llama.CausalLM(cfg2), nil, shapes.Make(dtypes.Int32, 1, 2))
	require.NoError(t, err)
	ids := []int32{1, 403, 407, 261}
	require.Equal(t, logitsOf(t, m, ids), logitsOf(t, m2, ids))
}

// The golden logits and loss come out the same whichever kernel runs the pure-Go backend's
// matrix products: the stock executor, the hook with naive loops (checked on every machine), and
// the hook with a BLAS library where one is installed.
func TestStories260KGoldenThroughMatmulKernels(t *testing.T) {
	b, err := backend.Get()
	require.NoError(t, err)
	if _, ok := b.(*simplego.Backend); !ok {
		t.Skipf("backend %s is not pure Go: no matmul hook to check", b.Name())
	}
	if prev := goexec.Installed(); prev != nil {
		defer func() { require.NoError(t, goexec.Install(*prev)) }()
	} else {
		defer goexec.Uninstall()
	}
	kernels := []*goexec.Kernels{nil}
	naive := goexec.Naive()
	kernels = append(kernels, &naive)
	if lib, err := blas.Load(); err == nil {
		kernels = append(kernels, &goexec.Kernels{Name: lib.Version, Float32: lib.Sgemm, Float64: lib.Dgemm})
	}
	g := readGolden(t)
	for _, k := range kernels {
		name := "stock"
		if k != nil {
			name = k.Name
		}
		t.Run(name, func(t *testing.T) {
			if k == nil {
				goexec.Uninstall()
			} else {
				require.NoError(t, goexec.Install(*k))
			}
			before := goexec.Counts()
			_, m := loadStories(t)
			logits := logitsOf(t, m, g.Bos.InputIDs)
			requireClose(t, g.Bos.LogitsPos0, logits[0], 1e-4, "logits_pos0")
			requireClose(t, g.Bos.LogitsPos1, logits[1], 1e-4, "logits_pos1")
			prompt := logitsOf(t, m, g.Prompt.InputIDs)
			requireClose(t, g.Prompt.LastLogits, prompt[len(prompt)-1], 1e-4, "prompt last_logits")
			hooked := goexec.Counts().Hooked - before.Hooked
			if k == nil {
				require.Zero(t, hooked, "products through the hook while uninstalled")
			} else {
				require.Positive(t, hooked, "no product went through the hook")
			}
		})
	}
}
