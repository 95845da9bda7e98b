package methods_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/full"
	"peft/ia3"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/prefixtuning"
	"peft/prompttuning"
	"peft/qlora"
)

// Each method saved by one model is rebuilt from its folder alone and loads into a fresh model
// with the same outputs.
func TestFromSavedRebuildsEveryMethod(t *testing.T) {
	for _, tc := range []struct {
		name string
		new  func() (peft.Method, error)
	}{
		{"lora", func() (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.Rank, cfg.Alpha = 4, 16
			return lora.New(cfg)
		}},
		{"adapter", func() (peft.Method, error) { return adapter.New(adapter.Houlsby()) }},
		{"prompt_tuning", func() (peft.Method, error) {
			cfg := prompttuning.DefaultConfig()
			cfg.NumVirtualTokens = 3
			return prompttuning.New(cfg)
		}},
		{"full", func() (peft.Method, error) { return full.New(full.Config{LayerDecay: 0.5}) }},
		{"qlora", func() (peft.Method, error) {
			cfg := qlora.DefaultConfig()
			cfg.Rank, cfg.Alpha, cfg.QuantType, cfg.BlockSize = 4, 16, "fp4", 32
			return qlora.New(cfg)
		}},
		{"adalora", func() (peft.Method, error) {
			cfg := adalora.DefaultConfig()
			cfg.InitRank, cfg.TargetRank, cfg.TotalSteps, cfg.TFinal = 6, 4, 100, 10
			return adalora.New(cfg)
		}},
		{"dora", func() (peft.Method, error) {
			cfg := lora.DefaultConfig()
			cfg.UseDoRA = true
			return lora.New(cfg)
		}},
		{"qdora", func() (peft.Method, error) {
			cfg := qlora.DefaultConfig()
			cfg.UseDoRA = true
			return qlora.New(cfg)
		}},
		{"ia3", func() (peft.Method, error) { return ia3.New(ia3.DefaultConfig()) }},
		{"prefix_tuning", func() (peft.Method, error) {
			cfg := prefixtuning.DefaultConfig()
			cfg.NumVirtualTokens = 3
			return prefixtuning.New(cfg)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			method, err := tc.new()
			require.NoError(t, err)
			m := pefttest.NewModel(t, method)
			for _, tv := range m.TrainableVariables() { // make the state differ from a fresh one
				values, err := peft.Float32s(tv.Variable)
				require.NoError(t, err)
				for i := range values {
					values[i] += 0.01 * float32(i%7)
				}
				require.NoError(t, peft.SetFloat32s(tv.Variable, values))
			}
			dir := t.TempDir()
			require.NoError(t, m.Save(dir))

			rebuilt, err := methods.FromSaved(dir)
			require.NoError(t, err)
			require.Equal(t, method.Name(), rebuilt.Name())
			require.Equal(t, method.Config(), rebuilt.Config())
			fresh := pefttest.NewModel(t, rebuilt)
			require.NoError(t, fresh.Load(dir))
			require.Equal(t, pefttest.Logits(t, m), pefttest.Logits(t, fresh))
		})
	}
	_, err := methods.FromSaved(t.TempDir())
	require.ErrorContains(t, err, "no saved adapter")
}

// A prefix trained through PEFT's MLP is saved as the prefix the MLP computes, which FromSaved
// rebuilds as an inference-mode prefix holding it: the same outputs without the MLP.
func TestFromSavedPrefixProjection(t *testing.T) {
	cfg := prefixtuning.DefaultConfig()
	cfg.NumVirtualTokens, cfg.PrefixProjection = 3, true
	method, err := prefixtuning.New(cfg)
	require.NoError(t, err)
	m := pefttest.NewModel(t, method)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	rebuilt, err := methods.FromSaved(dir)
	require.NoError(t, err)
	require.True(t, rebuilt.Config().(prefixtuning.Config).InferenceMode)
	fresh := pefttest.NewModel(t, rebuilt)
	require.NoError(t, fresh.Load(dir))
	want, got := pefttest.Logits(t, m), pefttest.Logits(t, fresh)
	for i := range want {
		require.InDeltaSlice(t, want[i], got[i], 1e-5)
	}
}
