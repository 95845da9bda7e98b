package prefixtuning_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/pefttest"
	"peft/peft/safetensors"
	"peft/prefixtuning"
)

func TestSaveLoad(t *testing.T) {
	pefttest.CheckSaveLoad(t, func() peft.Method {
		return newPT(t, func(c *prefixtuning.Config) { c.NumVirtualTokens = 6; c.ModulesToSave = []string{"score"} })
	})
}

func TestLoadInFreshProcess(t *testing.T) {
	pefttest.CheckLoadInFreshProcess(t, "TestLoadInFreshProcess", func() peft.Method {
		return newPT(t, func(c *prefixtuning.Config) { c.NumVirtualTokens = 6; c.ModulesToSave = []string{"score"} })
	})
}

// readFolder returns a saved folder's adapter_config.json as a map and its tensors.
func readFolder(t *testing.T, dir string) (map[string]any, *safetensors.File) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, peft.AdapterConfigFile))
	require.NoError(t, err)
	var fields map[string]any
	require.NoError(t, json.Unmarshal(data, &fields))
	file, err := safetensors.Read(filepath.Join(dir, peft.AdapterWeightsFile))
	require.NoError(t, err)
	return fields, file
}

// The files PEFT reads: exactly PEFT's fields, with its grouped-query rewrite on the tiny model (4
// query heads, 2 kv heads of 8: token_dim 16, num_attention_heads 2), and one tensor,
// prompt_embeddings [P, L·2·token_dim], holding the prefix; with prefix_projection the computed
// prefix (the MLP's output), not its parameters.
func TestPEFTFiles(t *testing.T) {
	ids := [][]int32{{1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 11, 12}}
	for _, tc := range []struct {
		name   string
		mutate func(*prefixtuning.Config)
		hidden float64
	}{
		{"plain", func(c *prefixtuning.Config) { c.NumVirtualTokens, c.Seed = 3, 5 }, 16},
		{"projection", func(c *prefixtuning.Config) {
			c.NumVirtualTokens, c.PrefixProjection, c.EncoderHiddenSize, c.Seed = 3, true, 24, 5
		}, 24},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPT(t, tc.mutate)
			m := pefttest.NewLlama(t, pefttest.Config(), 0, p, 2, 6)
			want := tensors.MustCopyFlatData[float32](pefttest.Call(t, m, ids, nil))
			dir := filepath.Join(t.TempDir(), "adapter")
			require.NoError(t, m.Save(dir))
			fields, file := readFolder(t, dir)
			require.Equal(t, map[string]any{
				"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3.0, "token_dim": 16.0,
				"num_transformer_submodules": 1.0, "num_attention_heads": 2.0, "num_layers": 2.0,
				"encoder_hidden_size": tc.hidden, "prefix_projection": p.Config().(prefixtuning.Config).PrefixProjection,
				"inference_mode": true, "base_model_name_or_path": nil, "revision": nil, "auto_mapping": nil,
			}, fields)
			require.Len(t, file.Tensors, 1)
			st := file.Tensors[0]
			require.Equal(t, "prompt_embeddings", st.Name)
			require.Equal(t, []int{3, 64}, st.Shape)
			saved, err := st.Float32s()
			require.NoError(t, err)
			prefix, err := p.PrefixValues()
			require.NoError(t, err)
			require.Equal(t, prefix, saved)

			// As PEFT loads it (inference mode): ParsePEFTConfig's configuration, here and from a
			// folder PEFT itself wrote (no record of ours), gives the trained model's logits.
			plainDir := filepath.Join(t.TempDir(), "plain")
			pefttest.WritePlainPEFT(t, dir, plainDir)
			for _, folder := range []string{dir, plainDir} {
				parsed, err := peft.ReadPEFTFields(folder)
				require.NoError(t, err)
				cfg, err := prefixtuning.ParsePEFTConfig(parsed)
				require.NoError(t, err)
				require.Equal(t, cfg.PrefixProjection, cfg.InferenceMode)
				loaded := newPT(t, func(c *prefixtuning.Config) { *c = cfg })
				lm := pefttest.NewLlama(t, pefttest.Config(), 0, loaded, 2, 6)
				require.NotEqual(t, want, tensors.MustCopyFlatData[float32](pefttest.Call(t, lm, ids, nil)), "the load would prove nothing")
				require.NoError(t, lm.Load(folder))
				require.InDeltaSlice(t, want, tensors.MustCopyFlatData[float32](pefttest.Call(t, lm, ids, nil)), 1e-5)
				require.EqualValues(t, 3*64, lm.Report().Trainable)

				// Saved again, the loaded adapter writes the same configuration and prefix.
				again := filepath.Join(t.TempDir(), "again")
				require.NoError(t, lm.Save(again))
				againFields, againFile := readFolder(t, again)
				require.Equal(t, fields, againFields)
				againValues, err := againFile.Tensors[0].Float32s()
				require.NoError(t, err)
				require.Equal(t, saved, againValues)
			}
			// NewForInference rebuilds the same from the configuration this SDK saved.
			rebuilt, err := prefixtuning.NewForInference(p.Config().(prefixtuning.Config))
			require.NoError(t, err)
			require.NoError(t, pefttest.NewLlama(t, pefttest.Config(), 0, rebuilt, 2, 6).Load(dir))
			if p.Config().(prefixtuning.Config).PrefixProjection {
				// The projection's parameters cannot be recovered from the computed prefix.
				err := pefttest.NewLlama(t, pefttest.Config(), 0, newPT(t, tc.mutate), 2, 6).Load(dir)
				require.ErrorContains(t, err, "cannot be loaded into the prefix_projection MLP")
				require.ErrorContains(t, err, "NewForInference")
			}
		})
	}
}

// A configuration that does not fit the model is refused, naming the field, before anything
// changes.
func TestLoadMismatch(t *testing.T) {
	p := newPT(t, func(c *prefixtuning.Config) { c.NumVirtualTokens = 3 })
	m := pefttest.NewLlama(t, pefttest.Config(), 0, p, 2, 6)
	dir := filepath.Join(t.TempDir(), "adapter")
	require.NoError(t, m.Save(dir))
	for _, tc := range []struct {
		field string
		value any
		want  string
	}{
		// PEFT before its grouped-query fix wrote hidden_size and num_attention_heads.
		{"token_dim", 32, "token_dim 32, the model needs 16 (kv heads × head width = 2 × 8"},
		{"num_attention_heads", 4, "num_attention_heads 4, the model needs 2"},
		{"num_layers", 3, "num_layers 3, the model needs 2"},
		{"num_virtual_tokens", 4, "num_virtual_tokens 4, the model's method has 3"},
		{"prefix_projection", true, "prefix_projection true, the model's method has false"},
		{"num_transformer_submodules", 2, `"num_transformer_submodules" = 2 changes what the adapter computes`},
		{"num_virtual_tokens", "three", `field "num_virtual_tokens"`},
	} {
		t.Run(tc.field, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "bad")
			pefttest.WritePlainPEFT(t, dir, bad)
			fields, _ := readFolder(t, bad)
			fields[tc.field] = tc.value
			data, err := json.Marshal(fields)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(bad, peft.AdapterConfigFile), data, 0o644))
			fresh := newPT(t, func(c *prefixtuning.Config) { c.NumVirtualTokens = 3 })
			fm := pefttest.NewLlama(t, pefttest.Config(), 0, fresh, 2, 6)
			before, err := peft.Float32s(fresh.Embedding())
			require.NoError(t, err)
			require.ErrorContains(t, fm.Load(bad), tc.want)
			after, err := peft.Float32s(fresh.Embedding())
			require.NoError(t, err)
			require.Equal(t, before, after)
		})
	}
}
