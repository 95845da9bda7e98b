package peft_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/pefttest"
)

func newLoRAModel(t *testing.T, mutate func(*lora.Config)) (*peft.Model, lora.Config) {
	t.Helper()
	cfg := lora.DefaultConfig()
	cfg.ModulesToSave = []string{"score"}
	if mutate != nil {
		mutate(&cfg)
	}
	l, err := lora.New(cfg)
	require.NoError(t, err)
	return pefttest.NewModel(t, l), cfg
}

// A LoRA model saves a Hugging Face PEFT folder: exactly the two files, adapter_config.json as
// PEFT writes it, and the SDK's configuration (seed included) comes back from the record in the
// tensors' metadata.
func TestSaveAndReadConfig(t *testing.T) {
	m, cfg := newLoRAModel(t, func(c *lora.Config) {
		c.Rank = 4
		c.RankPattern = peft.Patterns[int]{{Key: "v_proj", Value: 2}}
		c.TargetModules = peft.TargetPattern(`.*\.(q|v)_proj`)
		c.Seed = 7
	})
	dir := filepath.Join(t.TempDir(), "nested", "state")
	require.NoError(t, m.Save(dir))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{peft.AdapterConfigFile, peft.AdapterWeightsFile}, names, "exactly the two files, no temporary ones")

	var back lora.Config
	method, err := peft.ReadConfig(dir, &back)
	require.NoError(t, err)
	require.Equal(t, "lora", method)
	require.Equal(t, cfg, back)

	data, err := os.ReadFile(filepath.Join(dir, peft.AdapterConfigFile))
	require.NoError(t, err)
	text := string(data)
	require.Contains(t, text, "\n  \"lora_alpha\": 8,\n", "indent 2, integral alpha as an integer")
	require.Contains(t, text, `"target_modules": ".*\\.(q|v)_proj"`)
	var raw map[string]any
	require.NoError(t, json.Unmarshal(data, &raw))
	require.Equal(t, "LORA", raw["peft_type"])
	require.Equal(t, "SEQ_CLS", raw["task_type"])
	require.Equal(t, true, raw["inference_mode"])
	require.EqualValues(t, 4, raw["r"])
	// Patterns are written resolved, one key per layer that differs, so that every PEFT version's
	// matching rule and any key order give the same ranks.
	require.Equal(t, map[string]any{`layers\.0\.self_attn\.v_proj`: 2.0, `layers\.1\.self_attn\.v_proj`: 2.0}, raw["rank_pattern"])
	require.Equal(t, map[string]any{}, raw["alpha_pattern"])
	require.Equal(t, []any{"score"}, raw["modules_to_save"])
	require.NotContains(t, raw, "seed", "PEFT before 0.14 fails on fields it does not know")
	var keys []string
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, `  "`) {
			keys = append(keys, strings.SplitN(strings.TrimSpace(line), `"`, 3)[1])
		}
	}
	require.True(t, slices.IsSorted(keys), "keys sorted as PEFT writes them: %v", keys)
	require.Len(t, keys, len(raw))

	_, err = peft.ReadConfig(filepath.Join(t.TempDir(), "none"), &back)
	require.ErrorContains(t, err, "no saved adapter in")
	var wrongType struct {
		Rank string `json:"r"`
	}
	_, err = peft.ReadConfig(dir, &wrongType)
	require.ErrorContains(t, err, "peft.ReadConfig: lora config in")
	for _, tc := range []struct {
		content string
		want    string
	}{
		{`{"format_version": 2, "method": "lora", "config": {}}`, "unsupported format version 2"},
		{`{"format_version": 1, "config": {}}`, "or no method name"},
		{`[1, 2]`, "is corrupt"},
		{`{"format_version": 1, "method": "x", "config": {}, "state_file": "../x"}`, "unexpected state_file"},
	} {
		bad := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(bad, peft.ConfigFile), []byte(tc.content), 0o644))
		_, err := peft.ReadConfig(bad, &back)
		require.ErrorContains(t, err, tc.want)
	}
}

func TestLoadRejectsOtherStates(t *testing.T) {
	saved, _ := newLoRAModel(t, nil)
	dir := t.TempDir()
	require.NoError(t, saved.Save(dir))

	// A method without a PEFT form.
	head := pefttest.NewModel(t, newHead("score"))
	err := head.Load(dir)
	require.ErrorContains(t, err, "holds a Hugging Face PEFT adapter, which method head cannot read")

	// The same method with another configuration: the message shows both.
	other, _ := newLoRAModel(t, func(c *lora.Config) { c.Rank = 4 })
	before := pefttest.Logits(t, other)
	err = other.Load(dir)
	require.ErrorContains(t, err, "adapter_config.json: rank 8 for model.layers.0.self_attn.q_proj (r, rank_pattern), the model's method has 4")
	require.Equal(t, before, pefttest.Logits(t, other), "a rejected load changes nothing")
	alpha, _ := newLoRAModel(t, func(c *lora.Config) { c.Alpha = 16 })
	require.ErrorContains(t, alpha.Load(dir), "scale 1 for model.layers.0.self_attn.q_proj (lora_alpha, alpha_pattern, use_rslora), the model's method has 2")
	targets, _ := newLoRAModel(t, func(c *lora.Config) { c.TargetModules = peft.TargetNames("q_proj") })
	require.ErrorContains(t, targets.Load(dir), `target_modules ["q_proj" "v_proj"] adapt model.layers.0.self_attn.v_proj, which the model's method leaves alone`)
	noHead, _ := newLoRAModel(t, func(c *lora.Config) { c.ModulesToSave = nil })
	require.ErrorContains(t, noHead.Load(dir), `modules_to_save ["score"] select other modules than the model's method saves (none)`)
	// Patterns written otherwise that resolve to the same ranks are the same adapter.
	patterned, _ := newLoRAModel(t, func(c *lora.Config) { c.RankPattern = peft.Patterns[int]{{Key: "v_proj", Value: 2}} })
	patternDir := t.TempDir()
	require.NoError(t, patterned.Save(patternDir))
	same2, _ := newLoRAModel(t, func(c *lora.Config) {
		c.RankPattern = peft.Patterns[int]{{Key: `layers\.\d\.self_attn\.v_proj`, Value: 2}, {Key: "q_proj", Value: 8}}
	})
	require.NoError(t, same2.Load(patternDir))
	require.Equal(t, pefttest.Logits(t, patterned), pefttest.Logits(t, same2))

	// Dropout, initialization and seed do not change a trained adapter.
	same, _ := newLoRAModel(t, func(c *lora.Config) { c.Seed, c.Dropout, c.InitA = 3, 0.1, lora.InitGaussian })
	require.NoError(t, same.Load(dir))
	require.Equal(t, pefttest.Logits(t, saved), pefttest.Logits(t, same))

	// This SDK's layout: the same configuration written with other spacing or key order is the
	// same configuration.
	headDir := t.TempDir()
	require.NoError(t, head.Save(headDir))
	data, err := os.ReadFile(filepath.Join(headDir, peft.ConfigFile))
	require.NoError(t, err)
	var raw map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(data, &raw))
	var cfg map[string]any
	require.NoError(t, json.Unmarshal(raw["config"], &cfg))
	reordered, err := json.MarshalIndent(cfg, "", "\t")
	require.NoError(t, err)
	raw["config"] = reordered
	data, err = json.Marshal(raw)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(headDir, peft.ConfigFile), data, 0o644))
	require.NoError(t, pefttest.NewModel(t, newHead("score")).Load(headDir))
	err = pefttest.NewModel(t, newHead("model.norm")).Load(headDir)
	require.ErrorContains(t, err, "the head config saved in")
	lm, _ := newLoRAModel(t, nil)
	require.ErrorContains(t, lm.Load(headDir), "holds a head state, the model uses lora")

	// No method: nothing to save or load.
	plain := pefttest.NewModel(t, nil)
	require.ErrorContains(t, plain.Save(t.TempDir()), "no method to save")
	require.ErrorContains(t, plain.Load(dir), "no method to load into")
}

// A method whose modules overlap ("score" twice) must still count, save and load each variable
// once.
func TestOverlappingModulesToSave(t *testing.T) {
	once, _ := newLoRAModel(t, nil)
	twice, _ := newLoRAModel(t, func(c *lora.Config) { c.ModulesToSave = []string{"score", "score.dense", "score"} })
	require.Equal(t, once.Report(), twice.Report())
	dir := t.TempDir()
	require.NoError(t, twice.Save(dir))
	again, _ := newLoRAModel(t, func(c *lora.Config) { c.ModulesToSave = []string{"score", "score.dense", "score"} })
	require.NoError(t, again.Load(dir))
}

// Save and Load of a method trained by the trainer, through the head-only method: the state is
// exactly the head, and loading it into a fresh model reproduces the outputs bit for bit.
func TestSaveLoadHead(t *testing.T) {
	m := pefttest.NewModel(t, newHead("score"))
	w := m.Context().GetVariableByScopeAndName("/score/dense", "weights")
	values, err := peft.Float32s(w)
	require.NoError(t, err)
	for i := range values {
		values[i] = float32(i) - 30
	}
	require.NoError(t, peft.SetFloat32s(w, values))
	want := pefttest.Logits(t, m)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))

	fresh := pefttest.NewModel(t, newHead("score"))
	require.NotEqual(t, want, pefttest.Logits(t, fresh))
	require.NoError(t, fresh.Load(dir))
	require.Equal(t, want, pefttest.Logits(t, fresh))
	// A state saved for other modules has other tensors.
	norm := pefttest.NewModel(t, newHead("model.norm"))
	require.NoError(t, norm.Save(filepath.Join(dir, "norm")))
	err = fresh.Load(filepath.Join(dir, "norm"))
	require.ErrorContains(t, err, "config saved in")
	require.Equal(t, []string{peft.ConfigFile, peft.StateFile}, filesIn(t, filepath.Join(dir, "norm")),
		"a method PEFT does not have saves in this SDK's layout")
}

func filesIn(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		if !e.IsDir() {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	return names
}
