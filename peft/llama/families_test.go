package llama_test

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/prompttuning"
	"peft/qlora"
)

// familiesDir holds tiny random checkpoints of each family in its Hugging Face layout, with the
// logits scripts/family_reference.py (an independent float64 numpy reading of transformers'
// modeling code, which reproduces stories260K's golden.json first) computes for them.
const familiesDir = "testdata/families"

type familyFixture struct {
	dir      string
	ids      []int32
	expected [][]float64
}

func familyFixtures(t *testing.T) map[string]familyFixture {
	t.Helper()
	entries, err := os.ReadDir(familiesDir)
	require.NoError(t, err)
	out := map[string]familyFixture{}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(familiesDir, e.Name())
		data, err := os.ReadFile(filepath.Join(dir, "expected.json"))
		require.NoError(t, err)
		var exp struct {
			InputIDs []int32     `json:"input_ids"`
			Logits   [][]float64 `json:"logits"`
		}
		require.NoError(t, json.Unmarshal(data, &exp))
		out[e.Name()] = familyFixture{dir: dir, ids: exp.InputIDs, expected: exp.Logits}
	}
	require.Len(t, out, 5)
	return out
}

func familyModel(t *testing.T, dir string, method peft.Method) (llama.Config, *peft.Model) {
	t.Helper()
	return pefttest.FolderModel(t, os.DirFS(dir), method, 12)
}

func familyLogits(t *testing.T, m *peft.Model, ids []int32) [][]float32 {
	t.Helper()
	out, err := m.Call(tensors.FromValue([][]int32{ids}))
	require.NoError(t, err)
	return out[0].Value().([][][]float32)[0]
}

func maxDiff(want [][]float64, got [][]float32) float64 {
	worst := 0.0
	for i := range want {
		for j := range want[i] {
			worst = math.Max(worst, math.Abs(want[i][j]-float64(got[i][j])))
		}
	}
	return worst
}

// Each family's logits agree with the independent reference: Llama 3 (llama3 rope scaling,
// explicit head_dim, eos list, tied head), Llama with linear rope scaling and attention/MLP biases,
// Qwen2 (q/k/v biases, rope_theta 1e6), Qwen3 (q/k norms, head_dim ≠ hidden/heads), Mistral
// (a sliding window shorter than the sequence).
func TestFamiliesMatchTheReference(t *testing.T) {
	for name, fx := range familyFixtures(t) {
		t.Run(name, func(t *testing.T) {
			cfg, m := familyModel(t, fx.dir, nil)
			got := familyLogits(t, m, fx.ids)
			diff := maxDiff(fx.expected, got)
			t.Logf("%s (%s): max |logit difference| %.3g", name, cfg.ModelType, diff)
			require.Less(t, diff, 1e-4)
		})
	}
}

func TestFamilyConfigs(t *testing.T) {
	fx := familyFixtures(t)
	llama3, _ := familyModel(t, fx["llama3"].dir, nil)
	require.Equal(t, llama.TokenIDs{2, 3, 4}, llama3.EOSTokenIDs)
	require.Equal(t, &llama.RopeScaling{RopeType: "llama3", Factor: 32, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 256}, llama3.RopeScaling)
	require.Equal(t, llama.Family{Architecture: "LlamaForCausalLM"}, llama3.Family())
	biased, _ := familyModel(t, fx["llama_linear_bias"].dir, nil)
	require.Equal(t, llama.Family{Architecture: "LlamaForCausalLM", QKVBias: true, OBias: true, MLPBias: true}, biased.Family())
	qwen2, _ := familyModel(t, fx["qwen2"].dir, nil)
	require.Equal(t, llama.Family{Architecture: "Qwen2ForCausalLM", QKVBias: true}, qwen2.Family())
	qwen3, _ := familyModel(t, fx["qwen3"].dir, nil)
	require.Equal(t, llama.Family{Architecture: "Qwen3ForCausalLM", QKNorm: true}, qwen3.Family())
	require.Equal(t, 16, qwen3.HeadDim())
	mistral, _ := familyModel(t, fx["mistral"].dir, nil)
	require.Equal(t, llama.Family{Architecture: "MistralForCausalLM", SlidingWindow: 4}, mistral.Family())
}

// Every family saves as its own Hugging Face folder (model_type, architecture, biases, norms) that
// reloads with the same logits, and LoRA works on it unchanged: identity at init, merged equals
// unmerged, and a merged export reloads as the adapted model.
func TestFamiliesSaveAndTakeLoRA(t *testing.T) {
	for name, fx := range familyFixtures(t) {
		t.Run(name, func(t *testing.T) {
			cfg, base := familyModel(t, fx.dir, nil)
			want := familyLogits(t, base, fx.ids)
			dir := t.TempDir()
			require.NoError(t, llama.SaveHF(dir, cfg, base.Context(), nil))
			var written map[string]any
			data, err := os.ReadFile(filepath.Join(dir, "config.json"))
			require.NoError(t, err)
			require.NoError(t, json.Unmarshal(data, &written))
			require.Equal(t, cfg.ModelType, written["model_type"])
			require.Equal(t, []any{cfg.Family().Architecture}, written["architectures"])
			reloadedCfg, reloaded := familyModel(t, dir, nil)
			require.Equal(t, cfg, reloadedCfg)
			require.Equal(t, want, familyLogits(t, reloaded, fx.ids))

			lcfg := lora.DefaultConfig()
			lcfg.TargetModules = peft.TargetPattern(peft.AllLinear)
			l, err := lora.New(lcfg)
			require.NoError(t, err)
			_, adapted := familyModel(t, fx.dir, l)
			require.Equal(t, want, familyLogits(t, adapted, fx.ids), "LoRA at init is the base model")
			pefttest.SetRandomB(t, adapted, 4, 0.1)
			unmerged := familyLogits(t, adapted, fx.ids)
			require.NoError(t, adapted.Merge())
			merged := familyLogits(t, adapted, fx.ids)
			for i := range merged {
				require.InDeltaSlice(t, unmerged[i], merged[i], 1e-4)
			}
			out := t.TempDir()
			require.NoError(t, llama.SaveHF(out, cfg, adapted.Context(), nil))
			_, export := familyModel(t, out, nil)
			exported := familyLogits(t, export, fx.ids)
			for i := range merged {
				require.InDeltaSlice(t, merged[i], exported[i], 1e-5)
			}
		})
	}
}

// The other methods run on every family unchanged: those that start at the base model
// reproduce it exactly; QLoRA (4-bit weights) and prompt tuning (virtual tokens) change the
// outputs, finite, one per real token.
func TestFamiliesTakeEveryMethod(t *testing.T) {
	for name, fx := range familyFixtures(t) {
		_, base := familyModel(t, fx.dir, nil)
		want := familyLogits(t, base, fx.ids)
		for _, tc := range []struct {
			method   string
			new      func() (peft.Method, error)
			identity bool
		}{
			{"adalora", func() (peft.Method, error) {
				c := adalora.DefaultConfig()
				c.TotalSteps, c.TargetModules = 10, peft.TargetPattern(peft.AllLinear)
				return adalora.New(c)
			}, true},
			{"adapter", func() (peft.Method, error) { return adapter.New(adapter.Houlsby()) }, true},
			{"qlora", func() (peft.Method, error) {
				c := qlora.DefaultConfig()
				c.BlockSize = 32
				return qlora.New(c)
			}, false},
			{"prompt_tuning", func() (peft.Method, error) {
				c := prompttuning.DefaultConfig()
				c.NumVirtualTokens = 4
				return prompttuning.New(c)
			}, false},
		} {
			t.Run(name+"/"+tc.method, func(t *testing.T) {
				method, err := tc.new()
				require.NoError(t, err)
				_, m := familyModel(t, fx.dir, method)
				got := familyLogits(t, m, fx.ids)
				require.Len(t, got, len(want))
				if tc.identity {
					require.Equal(t, want, got)
					return
				}
				diff := 0.0
				for i := range want {
					for j := range want[i] {
						require.False(t, math.IsNaN(float64(got[i][j])))
						diff = math.Max(diff, math.Abs(float64(want[i][j]-got[i][j])))
					}
				}
				t.Logf("max |logit change| %.3g", diff)
				require.Greater(t, diff, 0.0)
			})
		}
	}
}

// Mistral's sliding_window as transformers reads it: absent is MistralConfig's default 4096, null
// is none; fields that would change the math and are not implemented are errors.
func TestFamilyConfigEdges(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(familiesDir, "mistral", "config.json"))
	require.NoError(t, err)
	parse := func(mutate func(map[string]any)) (llama.Config, error) {
		var fields map[string]any
		require.NoError(t, json.Unmarshal(data, &fields))
		mutate(fields)
		out, err := json.Marshal(fields)
		require.NoError(t, err)
		return llama.ParseConfig(out)
	}
	cfg, err := parse(func(f map[string]any) { delete(f, "sliding_window") })
	require.NoError(t, err)
	require.Equal(t, 4096, cfg.Family().SlidingWindow)
	cfg, err = parse(func(f map[string]any) { f["sliding_window"] = nil })
	require.NoError(t, err)
	require.Zero(t, cfg.Family().SlidingWindow)
	_, err = parse(func(f map[string]any) { f["partial_rotary_factor"] = 0.5 })
	require.ErrorContains(t, err, "partial_rotary_factor 0.5 is not supported")
	_, err = parse(func(f map[string]any) { f["layer_types"] = []string{"full_attention", "sliding_attention"} })
	require.ErrorContains(t, err, `layer_types[1] is "sliding_attention"`)
	_, err = parse(func(f map[string]any) { f["model_type"] = "gemma" })
	require.ErrorContains(t, err, `unsupported model_type "gemma"`)

	// The family's defaults for what config.json leaves out: Qwen3's head_dim 128 and 32 kv heads.
	cfg, err = parse(func(f map[string]any) {
		f["model_type"], f["architectures"], f["num_attention_heads"] = "qwen3", []string{"Qwen3ForCausalLM"}, 32
		delete(f, "head_dim")
		delete(f, "num_key_value_heads")
		delete(f, "sliding_window")
	})
	require.NoError(t, err)
	require.Equal(t, 128, cfg.HeadDim())
	require.Equal(t, 32, cfg.NumKVHeads)
}

// transformers v5 writes rope_theta and rope_scaling inside rope_parameters: the same model.
func TestRopeParameters(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(familiesDir, "llama3", "config.json"))
	require.NoError(t, err)
	v4, err := llama.ParseConfig(data)
	require.NoError(t, err)
	var fields map[string]any
	require.NoError(t, json.Unmarshal(data, &fields))
	params := fields["rope_scaling"].(map[string]any)
	params["rope_theta"] = fields["rope_theta"]
	fields["rope_parameters"] = params
	delete(fields, "rope_scaling")
	fields["rope_theta"] = nil
	v5data, err := json.Marshal(fields)
	require.NoError(t, err)
	v5, err := llama.ParseConfig(v5data)
	require.NoError(t, err)
	require.Equal(t, v4, v5)

	for _, tc := range []struct {
		mutate func(map[string]any)
		want   string
	}{
		{func(f map[string]any) { delete(f, "rope_parameters") }, "rope_theta is null"},
		{func(f map[string]any) { f["rope_theta"] = 10000.0 }, "rope_theta 10000 disagrees with rope_parameters.rope_theta 500000"},
		{func(f map[string]any) {
			f["rope_parameters"] = map[string]any{"rope_type": "yarn", "rope_theta": 1e4, "factor": 2}
		}, `"yarn" is not supported`},
	} {
		var f map[string]any
		require.NoError(t, json.Unmarshal(v5data, &f))
		tc.mutate(f)
		out, err := json.Marshal(f)
		require.NoError(t, err)
		_, err = llama.ParseConfig(out)
		require.ErrorContains(t, err, tc.want)
	}
}

// A null bos_token_id (Qwen) stays null when the config is written back.
func TestNullBOSRoundTrip(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(familiesDir, "qwen2", "config.json"))
	require.NoError(t, err)
	cfg, err := llama.ParseConfig(data)
	require.NoError(t, err)
	require.Nil(t, cfg.BOSTokenID)
	fields, err := cfg.HFConfig()
	require.NoError(t, err)
	require.Contains(t, fields, "bos_token_id")
	require.Nil(t, fields["bos_token_id"])
}
