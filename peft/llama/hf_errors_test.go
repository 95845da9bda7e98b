package llama_test

import (
	"encoding/binary"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"testing/fstest"

	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes/bfloat16"
	"github.com/stretchr/testify/require"
	"github.com/x448/float16"

	"peft/peft"
	"peft/peft/llama"
	"peft/peft/safetensors"
	"peft/peft/stories260k"
)

// storiesFiles returns the embedded model's config and tensors, for tests to rewrite.
func storiesFiles(t *testing.T) (map[string]any, []safetensors.Tensor) {
	t.Helper()
	data, err := fs.ReadFile(stories260k.FS(), "config.json")
	require.NoError(t, err)
	var cfg map[string]any
	require.NoError(t, json.Unmarshal(data, &cfg))
	weights, err := fs.ReadFile(stories260k.FS(), "model.safetensors")
	require.NoError(t, err)
	f, err := safetensors.Parse(weights)
	require.NoError(t, err)
	return cfg, f.Tensors
}

func folder(t *testing.T, cfg map[string]any, tensors []safetensors.Tensor) fstest.MapFS {
	t.Helper()
	fsys := fstest.MapFS{}
	if cfg != nil {
		data, err := json.Marshal(cfg)
		require.NoError(t, err)
		fsys["config.json"] = &fstest.MapFile{Data: data}
	}
	if tensors != nil {
		data, err := safetensors.Encode(tensors, nil)
		require.NoError(t, err)
		fsys["model.safetensors"] = &fstest.MapFile{Data: data}
	}
	return fsys
}

func TestLoadPretrainedErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(cfg map[string]any, tensors []safetensors.Tensor) (map[string]any, []safetensors.Tensor)
		want   []string
	}{
		{"no config", func(_ map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) { return nil, ts }, []string{"no config.json"}},
		{"no weights", func(c map[string]any, _ []safetensors.Tensor) (map[string]any, []safetensors.Tensor) { return c, nil }, []string{"no weights"}},
		{"model type", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["model_type"] = "gpt2"
			return c, ts
		}, []string{`unsupported model_type "gpt2"`}},
		{"architecture", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["architectures"] = []string{"MistralForCausalLM"}
			return c, ts
		}, []string{`unsupported architecture "MistralForCausalLM" for model_type "llama"`}},
		{"rope type", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["rope_scaling"] = map[string]any{"rope_type": "yarn", "factor": 2}
			return c, ts
		}, []string{`rope_scaling.rope_type "yarn" is not supported`}},
		{"llama3 rope without its fields", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["rope_scaling"] = map[string]any{"rope_type": "llama3", "factor": 8}
			return c, ts
		}, []string{"rope_scaling of rope_type llama3 needs"}},
		{"qwen sliding window", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["model_type"], c["architectures"], c["use_sliding_window"] = "qwen2", []string{"Qwen2ForCausalLM"}, true
			return c, ts
		}, []string{"use_sliding_window is not supported for model_type qwen2"}},
		{"mistral with biases", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["model_type"], c["architectures"], c["attention_bias"] = "mistral", []string{"MistralForCausalLM"}, true
			return c, ts
		}, []string{"not part of model_type mistral"}},
		{"qwen2 without its biases", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["model_type"], c["architectures"] = "qwen2", []string{"Qwen2ForCausalLM"}
			return c, ts
		}, []string{"model.layers.0.self_attn.q_proj.bias is missing"}},
		{"a million layers", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["num_hidden_layers"] = 1000000
			return c, ts
		}, []string{"num_hidden_layers 1000000 is over the limit of 1024"}},
		{"a huge vocabulary", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["vocab_size"] = 1 << 30
			return c, ts
		}, []string{"vocab_size 1073741824 is over the limit of 4194304"}},
		{"eos list of strings", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["eos_token_id"] = []string{"</s>"}
			return c, ts
		}, []string{"a token id or a list of token ids"}},
		{"sizes disagree", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			c["intermediate_size"] = 128
			return c, ts
		}, []string{"model.layers.0.mlp.gate_proj.weight", "[172 64]", "[128 64]"}},
		{"missing tensor", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			return c, dropTensor(ts, "model.layers.3.mlp.up_proj.weight")
		}, []string{"model.layers.3.mlp.up_proj.weight is missing"}},
		{"unexpected tensor", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			return c, append(ts, safetensors.FromFloat32("model.layers.0.self_attn.q_proj.bias", []int{64}, make([]float32, 64)))
		}, []string{"unexpected tensors", "model.layers.0.self_attn.q_proj.bias"}},
		{"tied head differs", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			ts = dropTensor(ts, "lm_head.weight") // the file has one, equal to the embeddings
			return c, append(ts, safetensors.FromFloat32("lm_head.weight", []int{512, 64}, make([]float32, 512*64)))
		}, []string{"lm_head.weight differs"}},
		{"unsupported dtype", func(c map[string]any, ts []safetensors.Tensor) (map[string]any, []safetensors.Tensor) {
			ts = dropTensor(ts, "model.norm.weight")
			return c, append(ts, safetensors.FromInt64("model.norm.weight", []int{64}, make([]int64, 64)))
		}, []string{"model.norm.weight"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, tensors := storiesFiles(t)
			cfg, tensors = tc.mutate(cfg, tensors)
			_, err := llama.LoadPretrainedFS(context.New(), folder(t, cfg, tensors))
			require.Error(t, err)
			for _, want := range tc.want {
				require.ErrorContains(t, err, want)
			}
		})
	}
}

func TestLoadPretrainedCorruptFiles(t *testing.T) {
	weights, err := fs.ReadFile(stories260k.FS(), "model.safetensors")
	require.NoError(t, err)
	config, err := fs.ReadFile(stories260k.FS(), "config.json")
	require.NoError(t, err)
	for name, fsys := range map[string]fstest.MapFS{
		"truncated weights": {"config.json": {Data: config}, "model.safetensors": {Data: weights[:len(weights)-100]}},
		"corrupt weights":   {"config.json": {Data: config}, "model.safetensors": {Data: append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, weights[8:]...)}},
		"corrupt config":    {"config.json": {Data: config[:40]}, "model.safetensors": {Data: weights}},
		"shard escapes":     {"config.json": {Data: config}, "model.safetensors.index.json": {Data: []byte(`{"weight_map": {"model.norm.weight": "../x.safetensors"}}`)}},
	} {
		_, err := llama.LoadPretrainedFS(context.New(), fsys)
		require.Error(t, err, name)
		t.Logf("%s: %v", name, err)
	}
}

func dropTensor(ts []safetensors.Tensor, name string) []safetensors.Tensor {
	var out []safetensors.Tensor
	for _, t := range ts {
		if t.Name != name {
			out = append(out, t)
		}
	}
	return out
}

// F16 and BF16 checkpoints load to exactly the values their bits encode; sharded checkpoints load
// like a single file.
func TestLoadPretrainedDTypesAndShards(t *testing.T) {
	cfg, tensors := storiesFiles(t)
	reference := context.New()
	_, err := llama.LoadPretrainedFS(reference, folder(t, cfg, tensors))
	require.NoError(t, err)
	vProj := func(ctx *context.Context) []float32 {
		v, err := peft.Float32s(ctx.GetVariableByScopeAndName("/model/layers/2/self_attn/v_proj/dense", "weights"))
		require.NoError(t, err)
		return v
	}

	for _, dtype := range []safetensors.DType{"F16", "BF16"} {
		t.Run(string(dtype), func(t *testing.T) {
			converted := make([]safetensors.Tensor, len(tensors))
			for i, ts := range tensors {
				values, err := ts.Float32s()
				require.NoError(t, err)
				data := make([]byte, 2*len(values))
				for j, v := range values {
					bits := float16.Fromfloat32(v).Bits()
					if dtype == "BF16" {
						bits = bfloat16.FromFloat32(v).Bits()
					}
					binary.LittleEndian.PutUint16(data[2*j:], bits)
				}
				converted[i] = safetensors.Tensor{Name: ts.Name, DType: dtype, Shape: ts.Shape, Data: data}
			}
			ctx := context.New()
			_, err := llama.LoadPretrainedFS(ctx, folder(t, cfg, converted))
			require.NoError(t, err)
			got, want := vProj(ctx), vProj(reference)
			for i := range want {
				rounded := float16.Fromfloat32(want[i]).Float32()
				if dtype == "BF16" {
					rounded = bfloat16.FromFloat32(want[i]).Float32()
				}
				require.Equal(t, rounded, got[i])
			}
		})
	}

	t.Run("sharded", func(t *testing.T) {
		half := len(tensors) / 2
		fsys := folder(t, cfg, nil)
		index := map[string]map[string]string{"weight_map": {}}
		for shard, part := range map[string][]safetensors.Tensor{
			"model-00001-of-00002.safetensors": tensors[:half], "model-00002-of-00002.safetensors": tensors[half:],
		} {
			data, err := safetensors.Encode(part, nil)
			require.NoError(t, err)
			fsys[shard] = &fstest.MapFile{Data: data}
			for _, ts := range part {
				index["weight_map"][ts.Name] = shard
			}
		}
		data, err := json.Marshal(index)
		require.NoError(t, err)
		fsys["model.safetensors.index.json"] = &fstest.MapFile{Data: data}
		ctx := context.New()
		_, err = llama.LoadPretrainedFS(ctx, fsys)
		require.NoError(t, err)
		require.Equal(t, vProj(reference), vProj(ctx))
	})
}

// Weight files that are links: inside the folder or into a Hugging Face cache's blobs they load;
// out of the folder, or to a device, they are refused before anything is read.
func TestWeightLinks(t *testing.T) {
	src := filepath.Join("..", "stories260k", "testdata", "stories260K")
	weights, err := filepath.Abs(filepath.Join(src, "model.safetensors"))
	require.NoError(t, err)
	config, err := os.ReadFile(filepath.Join(src, "config.json"))
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		link func(root string) string // makes the layout, returns the model folder
		want string
	}{
		{"inside the folder", func(root string) string {
			require.NoError(t, os.Link(weights, filepath.Join(root, "weights.bin")))
			require.NoError(t, os.Symlink("weights.bin", filepath.Join(root, "model.safetensors")))
			return root
		}, ""},
		{"Hugging Face cache", func(root string) string {
			require.NoError(t, os.MkdirAll(filepath.Join(root, "blobs"), 0o755))
			require.NoError(t, os.MkdirAll(filepath.Join(root, "snapshots", "abc"), 0o755))
			require.NoError(t, os.Link(weights, filepath.Join(root, "blobs", "123")))
			require.NoError(t, os.Symlink("../../blobs/123", filepath.Join(root, "snapshots", "abc", "model.safetensors")))
			return filepath.Join(root, "snapshots", "abc")
		}, ""},
		{"out of the folder", func(root string) string {
			require.NoError(t, os.Mkdir(filepath.Join(root, "model"), 0o755))
			require.NoError(t, os.Link(weights, filepath.Join(root, "elsewhere.safetensors")))
			require.NoError(t, os.Symlink("../elsewhere.safetensors", filepath.Join(root, "model", "model.safetensors")))
			return filepath.Join(root, "model")
		}, "model.safetensors is a symbolic link out of the folder (to ../elsewhere.safetensors)"},
		{"a device", func(root string) string {
			require.NoError(t, os.Symlink("/dev/zero", filepath.Join(root, "model.safetensors")))
			return root
		}, "model.safetensors is a symbolic link out of the folder (to /dev/zero)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.link(t.TempDir())
			require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), config, 0o644))
			ctx := context.New()
			_, err := llama.LoadPretrained(ctx, dir)
			if tc.want == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.want)
			require.Zero(t, ctx.NumVariables())
		})
	}
}

// Loading into a context that holds another model, whose variables have other shapes, is refused
// before any variable is changed.
func TestLoadIntoAFilledContextChangesNothing(t *testing.T) {
	ctx := context.New()
	_, err := llama.LoadPretrained(ctx, filepath.Join("..", "stories260k", "testdata", "stories260K"))
	require.NoError(t, err)
	before := map[string][]float32{}
	for v := range ctx.IterVariables() {
		values, err := peft.Float32s(v)
		require.NoError(t, err)
		before[v.ScopeAndName()] = values
	}
	_, err = llama.LoadPretrained(ctx, filepath.Join("testdata", "families", "llama3"))
	require.ErrorContains(t, err, "the context already holds /model/embed_tokens/embeddings as (Float32)[512 64], the checkpoint's model.embed_tokens.weight is [64 32]: load into a new context")
	require.Equal(t, len(before), ctx.NumVariables())
	for v := range ctx.IterVariables() {
		values, err := peft.Float32s(v)
		require.NoError(t, err)
		require.Equal(t, before[v.ScopeAndName()], values, v.ScopeAndName())
	}
}
