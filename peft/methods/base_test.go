package methods_test

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/full"
	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/prompttuning"
	"peft/qlora"
)

// tinyWithSeed is the tiny Llama classifier whose base weights come from seed, with method.
func tinyWithSeed(t *testing.T, seed uint64, method peft.Method) *peft.Model {
	t.Helper()
	return tiny(t, seed, 2, method)
}

// tiny is the tiny Llama from seed, a classifier (labels > 0) or a language model, with method.
func tiny(t *testing.T, seed uint64, labels int, method peft.Method) *peft.Model {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	cfg := pefttest.Config()
	require.NoError(t, llama.Init(ctx, cfg, labels, seed))
	fn := llama.CausalLM(cfg)
	if labels > 0 {
		fn = llama.Classifier(cfg, labels)
	}
	m, err := peft.NewModel(b, ctx, fn, method, shapes.Make(dtypes.Int32, pefttest.Batch, pefttest.Seq))
	require.NoError(t, err)
	return m
}

// flatLogits runs m on the first toy batch and returns its output's values.
func flatLogits(t *testing.T, m *peft.Model) []float32 {
	t.Helper()
	out, err := m.Call(pefttest.ToyBatches(1, 99)[0].Inputs...)
	require.NoError(t, err)
	return tensors.MustCopyFlatData[float32](out[0])
}

func newLoRA(t *testing.T) *lora.LoRA {
	t.Helper()
	cfg := lora.DefaultConfig()
	cfg.ModulesToSave = []string{"score"}
	l, err := lora.New(cfg)
	require.NoError(t, err)
	return l
}

// An adapter knows its base: loading it onto other base weights is refused unless allowed, and a
// new head saved with the adapter does not count as the base.
func TestAdapterKnowsItsBase(t *testing.T) {
	m := tinyWithSeed(t, 1, newLoRA(t))
	require.Len(t, m.BaseFingerprint(), 64)
	pefttest.Train(t, m, 3, 1e-2)
	peft.NameBaseModel(m.Context(), "tiny-llama")
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))

	other := tinyWithSeed(t, 2, newLoRA(t))
	require.NotEqual(t, m.BaseFingerprint(), other.BaseFingerprint())
	before := pefttest.Logits(t, other)
	err := other.Load(dir)
	require.ErrorIs(t, err, peft.ErrOtherBase)
	require.ErrorContains(t, err, "saved on base model tiny-llama")
	require.ErrorContains(t, err, "peft.AllowOtherBase()")
	require.Equal(t, before, pefttest.Logits(t, other))
	require.NoError(t, other.Load(dir, peft.AllowOtherBase()))

	// The same base with another score head (saved with the adapter): the same fingerprint.
	sameBase := tinyWithSeed(t, 1, newLoRA(t))
	head := sameBase.Context().GetVariableByScopeAndName("/score/dense", "weights")
	values, err := peft.Float32s(head)
	require.NoError(t, err)
	values[0] += 1
	require.NoError(t, peft.SetFloat32s(head, values))
	require.NoError(t, sameBase.Load(dir))
	require.Equal(t, pefttest.Logits(t, m), pefttest.Logits(t, sameBase))
	require.NoError(t, sameBase.Load(dir, peft.AdapterName("default")), `PEFT keeps "default" in the folder itself`)

	// base_model_name_or_path is written for PEFT's AutoPeftModel.
	fields, err := peft.ReadPEFTFields(dir)
	require.NoError(t, err)
	var name string
	require.NoError(t, fields.Get("base_model_name_or_path", &name))
	require.Equal(t, "tiny-llama", name)

	// Editing what does not change the adapter (the base's Hub id, line endings, formatting)
	// keeps the SDK's record: the exact configuration comes back and the base is still checked.
	data, err := os.ReadFile(filepath.Join(dir, peft.AdapterConfigFile))
	require.NoError(t, err)
	edited := strings.ReplaceAll(strings.Replace(string(data), `"tiny-llama"`, `"org/tiny-llama"`, 1), "\n", "\r\n")
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterConfigFile), []byte(edited), 0o644))
	rebuilt, err := methods.FromFolder(dir)
	require.NoError(t, err)
	require.Equal(t, m.Method().Config(), rebuilt.Config())
	require.ErrorIs(t, other.Load(dir), peft.ErrOtherBase)
	// Editing what changes it (or a save interrupted between the two files) is an error, unless
	// the folder is read as a plain PEFT adapter.
	edited = strings.Replace(edited, `"lora_alpha": 8`, `"lora_alpha": 4`, 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterConfigFile), []byte(edited), 0o644))
	_, err = methods.FromFolder(dir)
	require.ErrorContains(t, err, "is not the configuration adapter_model.safetensors was saved with")
	require.ErrorContains(t, sameBase.Load(dir), "scale 0.5 for model.layers.0.self_attn.q_proj")
	rebuilt, err = methods.FromFolder(dir, peft.AsPlainPEFT())
	require.NoError(t, err)
	require.Equal(t, 4.0, rebuilt.Config().(lora.Config).Alpha)
	plainModel := tinyWithSeed(t, 2, rebuilt) // no fingerprint is read: another base loads
	require.NoError(t, plainModel.Load(dir, peft.AsPlainPEFT()))

	// Full fine-tuning saves the whole model: no base to check.
	f, err := full.New(full.DefaultConfig())
	require.NoError(t, err)
	require.Empty(t, tinyWithSeed(t, 1, f).BaseFingerprint())
}

// One method value belongs to one model.
func TestMethodValueAppliedOnce(t *testing.T) {
	l := newLoRA(t)
	first := tinyWithSeed(t, 1, l)
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, pefttest.Config(), 2, 1))
	_, err = peft.NewModel(b, ctx, llama.Classifier(pefttest.Config(), 2), l, shapes.Make(dtypes.Int32, 2, 4))
	require.ErrorContains(t, err, "already applied to another model")
	_ = pefttest.Logits(t, first) // the first model still works

	// A NewModel that fails does not bind the method: it can be applied again.
	p, err := prompttuning.New(prompttuning.DefaultConfig())
	require.NoError(t, err)
	ctx = context.New()
	require.NoError(t, llama.Init(ctx, pefttest.Config(), 2, 1))
	_, err = peft.NewModel(b, ctx, llama.Classifier(pefttest.Config(), 2), p, shapes.Make(dtypes.Int32, 1, 60))
	require.ErrorContains(t, err, "more than the model's maximum length")
	ctx = context.New()
	require.NoError(t, llama.Init(ctx, pefttest.Config(), 2, 1))
	_, err = peft.NewModel(b, ctx, llama.Classifier(pefttest.Config(), 2), p, shapes.Make(dtypes.Int32, 1, 8))
	require.NoError(t, err)

	// Two NewModel calls racing for one method value: exactly one gets it. (The winner is kept
	// alive: a method whose model is gone may be applied again.)
	shared := newLoRA(t)
	type result struct {
		m   *peft.Model
		err error
	}
	results := make(chan result, 2)
	for range 2 {
		go func() {
			ctx := context.New()
			if err := llama.Init(ctx, pefttest.Config(), 2, 1); err != nil {
				results <- result{err: err}
				return
			}
			m, err := peft.NewModel(b, ctx, llama.Classifier(pefttest.Config(), 2), shared, shapes.Make(dtypes.Int32, 2, 4))
			results <- result{m, err}
		}()
	}
	ra, rb := <-results, <-results
	require.True(t, (ra.err == nil) != (rb.err == nil), "one NewModel must win: %v, %v", ra.err, rb.err)
	runtime.KeepAlive(ra.m)
	runtime.KeepAlive(rb.m)
}

func plainLoRA() peft.Method {
	l, err := lora.New(lora.DefaultConfig())
	if err != nil {
		panic(err)
	}
	return l
}

// llama.SaveHF writes the base weights: with an unmerged or unmergeable fine-tune applied to the
// context it refuses, instead of silently dropping the fine-tune.
func TestSaveHFRefusesUnmergedFineTunes(t *testing.T) {
	cfg := pefttest.Config()
	for _, tc := range []struct {
		name   string
		method func() peft.Method
		merge  bool
		want   string
	}{
		{"unmerged LoRA", plainLoRA, false, "not merged into the base weights"},
		{"merged LoRA", plainLoRA, true, ""},
		{"adapters", func() peft.Method {
			a, err := adapter.New(adapter.Houlsby())
			require.NoError(t, err)
			return a
		}, false, "cannot be merged"},
		{"prompt tuning", func() peft.Method {
			p, err := prompttuning.New(prompttuning.DefaultConfig())
			require.NoError(t, err)
			return p
		}, false, "cannot be merged"},
		{"full", func() peft.Method {
			f, err := full.New(full.DefaultConfig())
			require.NoError(t, err)
			return f
		}, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := tiny(t, 1, 0, tc.method())
			if tc.merge {
				require.NoError(t, m.Merge())
			}
			err := llama.SaveHF(t.TempDir(), cfg, m.Context(), nil)
			if tc.want == "" {
				require.NoError(t, err)
			} else {
				require.ErrorContains(t, err, tc.want)
			}
		})
	}
}

// Full fine-tuning saves a Hugging Face model folder that llama.LoadPretrained (and so
// transformers) loads as a plain model with the fine-tuned outputs.
func TestFullSavesHFModelFolder(t *testing.T) {
	f, err := full.New(full.DefaultConfig())
	require.NoError(t, err)
	b, err := backend.Get()
	require.NoError(t, err)
	cfg := pefttest.Config()
	ctx := context.New()
	require.NoError(t, llama.Init(ctx, cfg, 0, 1))
	lm := llama.CausalLM(cfg)
	example := shapes.Make(dtypes.Int32, pefttest.Batch, pefttest.Seq)
	m, err := peft.NewModel(b, ctx, lm, f, example)
	require.NoError(t, err)
	w := ctx.GetVariableByScopeAndName("/model/layers/0/mlp/up_proj/dense", "weights")
	values, err := peft.Float32s(w)
	require.NoError(t, err)
	for i := range values {
		values[i] *= 1.5
	}
	require.NoError(t, peft.SetFloat32s(w, values))
	want := flatLogits(t, m)

	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	for _, name := range []string{peft.ConfigFile, peft.ModelWeightsFile, peft.ModelConfigFile} {
		_, err := os.Stat(filepath.Join(dir, name))
		require.NoError(t, err, name)
	}
	loaded := context.New()
	loadedCfg, err := llama.LoadPretrained(loaded, dir)
	require.NoError(t, err)
	require.Equal(t, cfg.HiddenSize, loadedCfg.HiddenSize)
	plain, err := peft.NewModel(b, loaded, llama.CausalLM(loadedCfg), nil, example)
	require.NoError(t, err)
	require.Equal(t, want, flatLogits(t, plain))

	// And it loads back as a full fine-tune.
	again := context.New()
	require.NoError(t, llama.Init(again, cfg, 0, 1))
	f2, err := methods.FromFolder(dir)
	require.NoError(t, err)
	m2, err := peft.NewModel(b, again, lm, f2, example)
	require.NoError(t, err)
	require.NoError(t, m2.Load(dir))
	require.Equal(t, want, flatLogits(t, m2))
}

// A QLoRA adapter is the LoRA folder PEFT would write for a 4-bit base: FromFolder rebuilds
// QLoRA from it; plain LoRA on the float base loads it when told the base differs (its weights
// are not the 4-bit ones it was trained on).
func TestQLoRASavesALoRAFolder(t *testing.T) {
	qcfg := qlora.DefaultConfig()
	qcfg.ModulesToSave = []string{"score"}
	q, err := qlora.New(qcfg)
	require.NoError(t, err)
	m := tinyWithSeed(t, 1, q)
	pefttest.Train(t, m, 3, 1e-2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	fields, err := peft.ReadPEFTFields(dir)
	require.NoError(t, err)
	require.Equal(t, "LORA", fields.PEFTType())
	rebuilt, err := methods.FromFolder(dir)
	require.NoError(t, err)
	require.Equal(t, "qlora", rebuilt.Name())
	require.Equal(t, q.Config(), rebuilt.Config())

	plain, err := lora.New(qcfg.Config)
	require.NoError(t, err)
	onFloat := tinyWithSeed(t, 1, plain)
	require.ErrorIs(t, onFloat.Load(dir), peft.ErrOtherBase)
	require.NoError(t, onFloat.Load(dir, peft.AllowOtherBase()))
	requireLogitsClose(t, pefttest.Logits(t, m), pefttest.Logits(t, onFloat), 0.05)
}
