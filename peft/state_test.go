package peft_test

import (
	"encoding/json"
	"os"
	"path/filepath"
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

func TestSaveAndReadConfig(t *testing.T) {
	m, cfg := newLoRAModel(t, func(c *lora.Config) {
		c.Rank = 4
		c.RankPattern = map[string]int{"v_proj": 2}
		c.TargetModules = peft.TargetPattern(`.*\.(q|v)_proj`)
	})
	dir := filepath.Join(t.TempDir(), "nested", "state")
	require.NoError(t, m.Save(dir))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{peft.ConfigFile, peft.StateFile}, names, "exactly the two files, no temporary ones")

	var back lora.Config
	method, err := peft.ReadConfig(dir, &back)
	require.NoError(t, err)
	require.Equal(t, "lora", method)
	require.Equal(t, cfg, back)

	// The config file is the documented JSON: format version, method, config, tensor count
	// (A and B of 2 layers × 2 targets, and the head).
	data, err := os.ReadFile(filepath.Join(dir, peft.ConfigFile))
	require.NoError(t, err)
	var raw map[string]any
	require.NoError(t, json.Unmarshal(data, &raw))
	require.EqualValues(t, 1, raw["format_version"])
	require.Equal(t, "lora", raw["method"])
	require.EqualValues(t, 9, raw["tensors"])
	require.Equal(t, `.*\.(q|v)_proj`, raw["config"].(map[string]any)["target_modules"])

	_, err = peft.ReadConfig(filepath.Join(t.TempDir(), "none"), &back)
	require.ErrorContains(t, err, "no saved method state in")
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

	// Another method.
	head := pefttest.NewModel(t, newHead("score"))
	err := head.Load(dir)
	require.ErrorContains(t, err, "holds a lora state, the model uses head")

	// The same method with another configuration: the message shows both.
	other, _ := newLoRAModel(t, func(c *lora.Config) { c.Rank = 4 })
	before := pefttest.Logits(t, other)
	err = other.Load(dir)
	require.ErrorContains(t, err, "the lora config saved in")
	compact := strings.Join(strings.Fields(err.Error()), "") // the saved config is indented
	require.Contains(t, compact, `saved{"r":8,`)
	require.Contains(t, compact, `model{"r":4,`)
	require.Equal(t, before, pefttest.Logits(t, other), "a rejected load changes nothing")

	// The same configuration written with other spacing or key order is the same configuration.
	data, err := os.ReadFile(filepath.Join(dir, peft.ConfigFile))
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
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.ConfigFile), data, 0o644))
	same, _ := newLoRAModel(t, nil)
	require.NoError(t, same.Load(dir))

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
}
