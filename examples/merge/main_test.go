package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/prefixtuning"
)

// -adapter takes a folder as Hugging Face PEFT writes it (here: ours with the SDK's metadata
// record removed): the merged model written to -out loads as a plain model whose logits are the
// adapted model's.
func TestMergesAPEFTFolder(t *testing.T) {
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	_, m := pefttest.StoriesModel(t, method)
	pefttest.SetRandomB(t, m, 2, 0.1)
	ids := tensors.FromValue([][]int32{{1, 403, 407, 261, 378}})
	out, err := m.Call(ids)
	require.NoError(t, err)
	want := tensors.MustCopyFlatData[float32](out[0])

	saved := t.TempDir()
	require.NoError(t, m.Save(saved))
	adapterDir := t.TempDir()
	pefttest.WritePlainPEFT(t, saved, adapterDir)

	merged := filepath.Join(t.TempDir(), "merged")
	require.NoError(t, run("", adapterDir, merged))
	require.InDeltaSlice(t, want, mergedLogits(t, merged, ids), 1e-5)
	_, err = os.Stat(filepath.Join(merged, "tokenizer.json"))
	require.NoError(t, err)
}

// mergedLogits loads the merged model folder dir as a plain model and returns its logits for ids.
func mergedLogits(t *testing.T, dir string, ids *tensors.Tensor) []float32 {
	t.Helper()
	loaded := context.New()
	cfg, err := llama.LoadPretrained(loaded, dir)
	require.NoError(t, err)
	b, err := backend.Get()
	require.NoError(t, err)
	plain, err := peft.NewModel(b, loaded, llama.CausalLM(cfg), nil, shapes.Make(dtypes.Int32, 1, 1))
	require.NoError(t, err)
	out, err := plain.Call(ids)
	require.NoError(t, err)
	return tensors.MustCopyFlatData[float32](out[0])
}

// The combine path end to end: two LoRA adapters of stories260K (ranks 4 and 2, scales 2 and 1)
// combined with -combine cat into a new adapter folder, which the merge path then folds into the
// base: the merged model's logits are the base's with 0.6·ΔW₁ − 0.4·ΔW₂ added to its weights.
func TestCombinesAdaptersThenMerges(t *testing.T) {
	ids := tensors.FromValue([][]int32{{1, 403, 407, 261, 378}})
	var dirs []string
	want := map[string][]float32{}
	weights := []float32{0.6, -0.4}
	for i, c := range []struct {
		rank    int
		alpha   float64
		targets []string
	}{{4, 8, []string{"q_proj", "v_proj"}}, {2, 2, []string{"q_proj", "o_proj"}}} {
		cfg := lora.DefaultConfig()
		cfg.Rank, cfg.Alpha, cfg.TargetModules = c.rank, c.alpha, peft.TargetNames(c.targets...)
		method, err := lora.New(cfg)
		require.NoError(t, err)
		_, m := pefttest.StoriesModel(t, method)
		pefttest.SetRandomB(t, m, uint64(i+1), 0.1)
		for _, path := range method.Targets() {
			d, err := method.Delta(path)
			require.NoError(t, err)
			if want[path] == nil {
				want[path] = make([]float32, len(d))
			}
			for j, x := range d {
				want[path][j] += weights[i] * x
			}
		}
		dir := t.TempDir()
		require.NoError(t, m.Save(dir))
		dirs = append(dirs, dir)
	}
	_, base := pefttest.StoriesModel(t, nil)
	for _, layer := range base.Layout().Linears {
		if d := want[layer.Path]; d != nil {
			w, err := peft.Float32s(layer.Weights(base.Context()))
			require.NoError(t, err)
			for j := range w {
				w[j] += d[j]
			}
			require.NoError(t, peft.SetFloat32s(layer.Weights(base.Context()), w))
		}
	}
	out, err := base.Call(ids)
	require.NoError(t, err)
	expected := tensors.MustCopyFlatData[float32](out[0])

	combined := filepath.Join(t.TempDir(), "combined")
	require.NoError(t, cli([]string{"-combine", "cat", "-adapter", dirs[0] + "," + dirs[1], "-weights", "0.6,-0.4", "-out", combined}))
	merged := filepath.Join(t.TempDir(), "merged")
	require.NoError(t, cli([]string{"-adapter", combined, "-out", merged}))
	require.InDeltaSlice(t, expected, mergedLogits(t, merged, ids), 1e-5)

	// The same adapters with -adapter repeated: ties refuses their ranks, ties_svd makes a rank-3
	// adapter of the union of their targets.
	tied := filepath.Join(t.TempDir(), "tied")
	require.ErrorContains(t, cli([]string{"-combine", "ties", "-adapter", dirs[0], "-adapter", dirs[1], "-density", "0.5", "-out", tied}), "ties needs adapters of one rank")
	require.NoError(t, cli([]string{"-combine", "ties_svd", "-adapter", dirs[0], "-adapter", dirs[1], "-density", "0.5", "-majority-sign", "frequency", "-svd-rank", "3", "-out", tied}))
	method, err := methods.FromFolder(tied)
	require.NoError(t, err)
	require.Equal(t, 3, method.Config().(lora.Config).Rank)
	require.Equal(t, peft.TargetNames("o_proj", "q_proj", "v_proj"), method.Config().(lora.Config).TargetModules)
}

func TestCommandLineMistakes(t *testing.T) {
	full := t.TempDir() // a folder holding something: a training run, a model
	require.NoError(t, os.WriteFile(filepath.Join(full, "config.json"), []byte("{}"), 0o644))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-out", "x"}, "-adapter and -out are required"},
		{[]string{"-adapter", "a,b", "-out", "x"}, "2 adapters given"},
		{[]string{"-adapter", "a", "-density", "0.5", "-out", "x"}, "-density is used with -combine only"},
		{[]string{"-combine", "cat", "-adapter", "a,b", "-model", "m", "-out", "x"}, "-model is not used with -combine"},
		{[]string{"-combine", "cat", "-adapter", "a,b", "-weights", "1,x", "-out", "x"}, `-weights: "x" is not a number`},
		{[]string{"-combine", "cat", "-adapter", "a,,b", "-out", "x"}, "empty item in the list"},
		{[]string{"-combine", "cat", "-adapter", "a,b", "-out", "./b"}, "-out ./b is also an -adapter: write to a new folder"},
		{[]string{"-adapter", "a", "-out", "a"}, "-out a is also an -adapter"},
		{[]string{"-adapter", "a", "-out", full}, "is not empty (it holds config.json…)"},
	} {
		err := cli(c.args)
		require.ErrorIs(t, err, errUsage, "%q", c.args)
		require.ErrorContains(t, err, c.want)
	}
}

// An adapter whose method adds computation (prefix tuning) is refused with what to do instead,
// and nothing is written.
func TestUnmergeableMethod(t *testing.T) {
	cfg := prefixtuning.DefaultConfig()
	cfg.NumVirtualTokens = 2
	method, err := prefixtuning.New(cfg)
	require.NoError(t, err)
	_, m := pefttest.StoriesModel(t, method)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	out := filepath.Join(t.TempDir(), "merged")
	require.ErrorContains(t, cli([]string{"-adapter", dir, "-out", out}), "a prefix_tuning adapter adds computation that no weight can hold")
	require.NoDirExists(t, out)
}
