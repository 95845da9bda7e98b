package combine_test

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/lora/combine"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/peft/safetensors"
	"peft/qlora"
)

// savedLoRA trains nothing: it applies LoRA with cfg to the tiny Llama (numLabels 0: causal LM),
// draws B from N(0, 0.2²) with seed so the adapter changes the model, and saves it.
func savedLoRA(t *testing.T, cfg lora.Config, seed uint64, numLabels int) (string, *lora.LoRA) {
	t.Helper()
	method, err := lora.New(cfg)
	require.NoError(t, err)
	m := pefttest.NewLlama(t, pefttest.Config(), numLabels, method, 1, pefttest.Seq)
	pefttest.SetRandomB(t, m, seed, 0.2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	return dir, method
}

func loraConfig(rank int, alpha float64, targets ...string) lora.Config {
	c := lora.DefaultConfig()
	c.Rank, c.Alpha, c.TargetModules = rank, alpha, peft.TargetNames(targets...)
	return c
}

// logits runs m on a fixed sequence and returns the flat logits.
func logits(t *testing.T, m *peft.Model) []float32 {
	t.Helper()
	out, err := m.Call(tensors.FromValue([][]int32{{1, 12, 25, 33, 40, 7, 19, 60}}))
	require.NoError(t, err)
	return tensors.MustCopyFlatData[float32](out[0])
}

// baseWithDeltas is the tiny Llama (no method) with deltas ([in, out] per layer path) added to
// its weights: what a correct adapter computes once merged.
func baseWithDeltas(t *testing.T, numLabels int, deltas map[string][]float64) *peft.Model {
	t.Helper()
	m := pefttest.NewLlama(t, pefttest.Config(), numLabels, nil, 1, pefttest.Seq)
	for _, layer := range m.Layout().Linears {
		d, ok := deltas[layer.Path]
		if !ok {
			continue
		}
		w, err := peft.Float32s(layer.Weights(m.Context()))
		require.NoError(t, err)
		for i := range w {
			w[i] += float32(d[i])
		}
		require.NoError(t, peft.SetFloat32s(layer.Weights(m.Context()), w))
		delete(deltas, layer.Path)
	}
	require.Empty(t, deltas, "layers the model does not have")
	return m
}

// addDelta adds f times method's update of every adapted layer to sum.
func addDelta(t *testing.T, sum map[string][]float64, method *lora.LoRA, f float64) {
	t.Helper()
	for _, path := range method.Targets() {
		d, err := method.Delta(path)
		require.NoError(t, err)
		if sum[path] == nil {
			sum[path] = make([]float64, len(d))
		}
		for i, x := range d {
			sum[path][i] += f * float64(x)
		}
	}
}

// The round trip: two adapters saved by this SDK (ranks 4 and 2, scales 2 and 1.5, different
// targets) combined into a folder that methods.FromFolder and Model.Load read onto the tiny
// Llama, whose logits are those of the base with the expected update merged: Σ wᵢ·ΔWᵢ for cat,
// Σ wᵢ·sᵢ·ΔWᵢ for svd at a rank that holds it all (PEFT weighs the updates by wᵢ·sᵢ).
func TestCombinedFolderLoadsAndComputesTheCombination(t *testing.T) {
	dir1, m1 := savedLoRA(t, loraConfig(4, 8, "q_proj", "v_proj"), 1, 0)
	dir2, m2 := savedLoRA(t, loraConfig(2, 3, "q_proj", "k_proj", "o_proj"), 2, 0)
	w := []float64{0.6, -0.4}
	for _, c := range []struct {
		cfg      combine.Config
		rank     int
		f1, f2   float64
		maxDelta float64
	}{
		{combine.Config{Type: combine.Cat, Weights: w}, 6, w[0], w[1], 0},
		{combine.Config{Type: combine.SVD, Weights: w, SVDRank: 6}, 6, w[0] * 2, w[1] * 1.5, 0},
	} {
		t.Run(string(c.cfg.Type), func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "combined")
			combined, err := combine.CombineDirs(out, []string{dir1, dir2}, c.cfg)
			require.NoError(t, err)
			require.Equal(t, c.rank, combined.Rank)
			method, err := methods.FromFolder(out)
			require.NoError(t, err)
			l := method.(*lora.LoRA)
			m := pefttest.NewLlama(t, pefttest.Config(), 0, l, 1, pefttest.Seq)
			require.NoError(t, m.Load(out))
			require.Len(t, l.Targets(), 3*pefttest.Config().NumLayers+1*pefttest.Config().NumLayers)
			want := map[string][]float64{}
			addDelta(t, want, m1, c.f1)
			addDelta(t, want, m2, c.f2)
			for _, path := range l.Targets() {
				got, err := l.Delta(path)
				require.NoError(t, err)
				worst := 0.0
				for i, x := range got {
					worst = max(worst, math.Abs(float64(x)-want[path][i]))
				}
				t.Logf("%s: update differs by %.3g", path, worst)
				require.Less(t, worst, 2e-6, "%s: update differs by %g", path, worst)
			}
			require.InDeltaSlice(t, logits(t, baseWithDeltas(t, 0, want)), logits(t, m), 1e-5)
			config, err := os.ReadFile(filepath.Join(out, peft.AdapterConfigFile))
			require.NoError(t, err)
			var fields map[string]any
			require.NoError(t, json.Unmarshal(config, &fields))
			require.Equal(t, float64(c.rank), fields["r"])
			require.Equal(t, float64(c.rank), fields["lora_alpha"])
			require.Equal(t, []any{"k_proj", "o_proj", "q_proj", "v_proj"}, fields["target_modules"])
			require.Equal(t, "CAUSAL_LM", fields["task_type"])
			require.Equal(t, false, fields["use_rslora"])

			// It keeps its inputs' base fingerprint: other base weights are refused.
			other, err := methods.FromFolder(out)
			require.NoError(t, err)
			b, err := backend.Get()
			require.NoError(t, err)
			ctx := context.New()
			require.NoError(t, llama.Init(ctx, pefttest.Config(), 0, 2)) // other random weights
			om, err := peft.NewModel(b, ctx, llama.CausalLM(pefttest.Config()), other, shapes.Make(dtypes.Int32, 1, pefttest.Seq))
			require.NoError(t, err)
			require.ErrorIs(t, om.Load(out), peft.ErrOtherBase)
		})
	}
}

// A folder as PEFT writes it (no record of ours) combines too; a layer whose rank differs from r
// (linear keeps each layer's rank) goes to rank_pattern and alpha_pattern, and the result loads.
func TestLinearKeepsLayerRanks(t *testing.T) {
	cfg := loraConfig(4, 4, "q_proj", "v_proj")
	cfg.RankPattern = peft.Patterns[int]{{Key: "v_proj", Value: 2}}
	dir1, _ := savedLoRA(t, cfg, 1, 0)
	dir2, _ := savedLoRA(t, cfg, 2, 0)
	plain := t.TempDir()
	pefttest.WritePlainPEFT(t, dir2, plain)
	out := t.TempDir()
	combined, err := combine.CombineDirs(out, []string{dir1, plain}, combine.Config{Type: combine.TIES, Weights: []float64{1, 0.5}, Density: 0.5})
	require.NoError(t, err)
	require.Equal(t, 4, combined.Rank)
	require.Equal(t, peft.Patterns[int]{{Key: "model.layers.0.self_attn.v_proj", Value: 2}, {Key: "model.layers.1.self_attn.v_proj", Value: 2}}, combined.Config.RankPattern)
	method, err := methods.FromFolder(out)
	require.NoError(t, err)
	m := pefttest.NewLlama(t, pefttest.Config(), 0, method, 1, pefttest.Seq)
	require.NoError(t, m.Load(out))
	want := map[string][]float64{}
	for _, l := range combined.Layers {
		d := l.Delta() // [out, in] → [in, out]
		want[l.Path] = make([]float64, len(d))
		for o := range l.Out {
			for i := range l.In {
				want[l.Path][i*l.Out+o] = d[o*l.In+i]
			}
		}
	}
	require.InDeltaSlice(t, logits(t, baseWithDeltas(t, 0, want)), logits(t, m), 1e-5)
}

// A module saved by one adapter (the classifier head) is carried over; saved by two, refused.
func TestModulesToSave(t *testing.T) {
	withHead := loraConfig(4, 4, "q_proj", "v_proj")
	withHead.ModulesToSave = []string{"score"}
	dir1, _ := savedLoRA(t, withHead, 1, 2)
	dir2, _ := savedLoRA(t, loraConfig(4, 4, "q_proj", "v_proj"), 2, 2)
	dir3, _ := savedLoRA(t, withHead, 3, 2)
	out := t.TempDir()
	combined, err := combine.CombineDirs(out, []string{dir2, dir1}, combine.Config{Type: combine.Linear, Weights: []float64{1, 1}})
	require.NoError(t, err)
	require.Equal(t, []string{"score"}, combined.Config.ModulesToSave)
	require.Len(t, combined.Modules, 1)
	require.Equal(t, "base_model.model.score.weight", combined.Modules[0].Name)
	method, err := methods.FromFolder(out)
	require.NoError(t, err)
	m := pefttest.NewLlama(t, pefttest.Config(), 2, method, 1, pefttest.Seq)
	require.NoError(t, m.Load(out))

	_, err = combine.CombineDirs(t.TempDir(), []string{dir1, dir3}, combine.Config{Type: combine.Cat, Weights: []float64{1, 1}})
	require.ErrorContains(t, err, "both save base_model.model.score.weight (modules_to_save)")
}

func TestFoldersOfDifferentModelsAreRefused(t *testing.T) {
	causal, _ := savedLoRA(t, loraConfig(4, 4, "q_proj"), 1, 0)
	classifier, _ := savedLoRA(t, loraConfig(4, 4, "q_proj"), 2, 2)
	dora := loraConfig(4, 4, "q_proj")
	dora.UseDoRA = true
	doraDir, _ := savedLoRA(t, dora, 3, 0)

	otherBase := t.TempDir() // this SDK's record with another base fingerprint
	file, err := safetensors.Read(filepath.Join(causal, peft.AdapterWeightsFile))
	require.NoError(t, err)
	var record map[string]any
	require.NoError(t, json.Unmarshal([]byte(file.Metadata["peft_go"]), &record))
	record["base_model"] = map[string]any{"fingerprint": strings.Repeat("ab", 32)}
	data, err := json.Marshal(record)
	require.NoError(t, err)
	require.NoError(t, safetensors.Write(filepath.Join(otherBase, peft.AdapterWeightsFile), file.Tensors, map[string]string{"format": "pt", "peft_go": string(data)}))
	config, err := os.ReadFile(filepath.Join(causal, peft.AdapterConfigFile))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(otherBase, peft.AdapterConfigFile), config, 0o644))

	wrongRank := t.TempDir() // a PEFT folder whose r disagrees with its tensors
	pefttest.WritePlainPEFT(t, causal, wrongRank)
	require.NoError(t, os.WriteFile(filepath.Join(wrongRank, peft.AdapterConfigFile), []byte(strings.Replace(string(config), `"r": 4`, `"r": 3`, 1)), 0o644))

	wideCfg := pefttest.Config()
	wideCfg.IntermediateSize = 48
	method, err := lora.New(loraConfig(4, 4, "down_proj"))
	require.NoError(t, err)
	wm := pefttest.NewLlama(t, wideCfg, 0, method, 1, pefttest.Seq)
	wide := t.TempDir()
	require.NoError(t, wm.Save(wide))
	narrow, _ := savedLoRA(t, loraConfig(4, 4, "down_proj"), 4, 0)
	plainWide := t.TempDir()
	pefttest.WritePlainPEFT(t, wide, plainWide)

	for _, c := range []struct {
		name string
		dirs []string
		want string
	}{
		{"task", []string{causal, classifier}, "has task_type SEQ_CLS, " + causal + " has CAUSAL_LM"},
		{"base", []string{causal, otherBase}, "adapters of different base models cannot be combined"},
		{"shape", []string{narrow, plainWide}, "layer model.layers.0.mlp.down_proj is [out 32, in 64] in " + narrow + " but [out 32, in 48] in " + plainWide},
		{"rank", []string{causal, wrongRank}, "disagree with rank 3 (r, rank_pattern) of layer model.layers.0.self_attn.q_proj"},
		{"dora", []string{causal, doraDir}, "use_dora: DoRA adapters cannot be combined"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := combine.CombineDirs(t.TempDir(), c.dirs, combine.Config{Type: combine.Cat, Weights: []float64{1, 1}})
			require.ErrorContains(t, err, c.want)
		})
	}
}

// QLoRA adapters combine into a QLoRA adapter that keeps their 4-bit base's fingerprint and
// quantization options (it rebuilds as QLoRA and loads onto that base); mixed with a LoRA
// adapter of the float base they are refused.
func TestQLoRAFolders(t *testing.T) {
	saveQLoRA := func(seed uint64, targets ...string) string {
		cfg := qlora.FromLoRA(loraConfig(2, 4, targets...))
		cfg.BlockSize = 32
		method, err := qlora.New(cfg)
		require.NoError(t, err)
		m := pefttest.NewLlama(t, pefttest.Config(), 0, method, 1, pefttest.Seq)
		pefttest.SetRandomB(t, m, seed, 0.2)
		dir := t.TempDir()
		require.NoError(t, m.Save(dir))
		return dir
	}
	q1, q2 := saveQLoRA(1, "q_proj"), saveQLoRA(2, "v_proj")
	out := filepath.Join(t.TempDir(), "combined")
	_, err := combine.CombineDirs(out, []string{q1, q2}, combine.Config{Type: combine.Cat, Weights: []float64{1, 1}})
	require.NoError(t, err)
	saved, err := peft.ReadAdapter(out)
	require.NoError(t, err)
	require.Equal(t, "qlora", saved.Method)
	require.NotEmpty(t, saved.BaseFingerprint)
	method, err := methods.FromFolder(out)
	require.NoError(t, err)
	require.Equal(t, 32, method.Config().(qlora.Config).BlockSize)
	m := pefttest.NewLlama(t, pefttest.Config(), 0, method, 1, pefttest.Seq)
	require.NoError(t, m.Load(out))

	plain, _ := savedLoRA(t, loraConfig(2, 4, "k_proj"), 3, 0)
	_, err = combine.CombineDirs(t.TempDir(), []string{q1, plain}, combine.Config{Type: combine.Cat, Weights: []float64{1, 1}})
	require.ErrorIs(t, err, peft.ErrOtherBase)
	require.ErrorContains(t, err, "was saved by qlora")
}
