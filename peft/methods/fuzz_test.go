package methods_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/methods"
	"peft/peft/pefttest"
	"peft/peft/safetensors"
)

// FuzzLoadPEFTFolder feeds adapter folders (adapter_config.json and adapter_model.safetensors
// bytes) to FromFolder and Load: neither may panic, and a failed load leaves the model as it was.
// Run longer with go test -run '^$' -fuzz FuzzLoadPEFTFolder ./peft/methods/.
func FuzzLoadPEFTFolder(f *testing.F) {
	rng := peft.NewRand(1)
	var loraTensors []safetensors.Tensor
	for _, l := range []string{"0", "1"} {
		p := peft.PEFTPrefix + "model.layers." + l + ".self_attn.q_proj"
		loraTensors = append(loraTensors,
			safetensors.FromFloat32(p+".lora_A.weight", []int{2, 32}, peft.Normal(rng, 64, 0.1)),
			safetensors.FromFloat32(p+".lora_B.weight", []int{32, 2}, peft.Normal(rng, 64, 0.1)))
	}
	seed := func(config map[string]any, tensors []safetensors.Tensor) {
		c, err := json.Marshal(config)
		require.NoError(f, err)
		w, err := safetensors.Encode(tensors, map[string]string{"format": "pt"})
		require.NoError(f, err)
		f.Add(c, w)
	}
	loraConfig := map[string]any{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": []string{"q_proj"},
		"rank_pattern": map[string]int{"layers\\.1\\..*": 2}}
	seed(loraConfig, loraTensors)
	adaTensors := []safetensors.Tensor{}
	for _, l := range []string{"0", "1"} {
		p := peft.PEFTPrefix + "model.layers." + l + ".self_attn.q_proj"
		adaTensors = append(adaTensors,
			safetensors.FromFloat32(p+".lora_A", []int{1, 32}, peft.Normal(rng, 32, 0.1)),
			safetensors.FromFloat32(p+".lora_E", []int{1, 1}, []float32{1}),
			safetensors.FromFloat32(p+".lora_B", []int{32, 1}, peft.Normal(rng, 32, 0.1)))
	}
	seed(map[string]any{"peft_type": "ADALORA", "init_r": 2, "target_r": 1, "total_step": 10, "target_modules": []string{"q_proj"},
		"rank_pattern": map[string][]bool{"model.layers.0.self_attn.q_proj.lora_E": {true, false},
			"model.layers.1.self_attn.q_proj.lora_E": {false, true}}}, adaTensors)
	seed(map[string]any{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 32},
		[]safetensors.Tensor{safetensors.FromFloat32("prompt_embeddings", []int{2, 32}, peft.Normal(rng, 64, 1))})
	seed(map[string]any{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "all-linear", "use_dora": true}, loraTensors)

	// The model loads into is a LoRA on the q projections with r = 2, as the first seed.
	dir := f.TempDir()
	writeFolder(f, dir, loraConfig, loraTensors)
	m := applyFolder(f, dir)
	before := pefttest.Logits(f, m)
	f.Fuzz(func(t *testing.T, config, weights []byte) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterConfigFile), config, 0o644))
		require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterWeightsFile), weights, 0o644))
		if _, err := methods.FromFolder(dir); err != nil {
			return
		}
		if err := m.Load(dir); err != nil {
			require.Equal(t, before, pefttest.Logits(t, m), "a failed load changed the model")
			return
		}
		writeFolder(t, dir, loraConfig, loraTensors) // put the model back for the next input
		require.NoError(t, m.Load(dir))
	})
}

func writeFolder(t testing.TB, dir string, config map[string]any, tensors []safetensors.Tensor) {
	t.Helper()
	c, err := json.Marshal(config)
	require.NoError(t, err)
	w, err := safetensors.Encode(tensors, map[string]string{"format": "pt"})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterConfigFile), c, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, peft.AdapterWeightsFile), w, 0o644))
}
