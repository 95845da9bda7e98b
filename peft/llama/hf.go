package llama

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/atomicfile"
	"peft/peft/safetensors"
)

// hfConfig is the part of a Hugging Face config.json we read beyond Config's own fields.
type hfConfig struct {
	Config
	Architectures []string         `json:"architectures"`
	ModelType     string           `json:"model_type"`
	HiddenAct     string           `json:"hidden_act"`
	HeadDim       int              `json:"head_dim"`
	RopeScaling   *json.RawMessage `json:"rope_scaling"`
	AttentionBias bool             `json:"attention_bias"`
	MLPBias       bool             `json:"mlp_bias"`
}

// ParseConfig reads a Hugging Face config.json of the Llama family. Architectures this model
// cannot run (another model type, rope scaling, biases, an activation other than SiLU, a head
// size other than hidden/heads) are errors that name the field.
func ParseConfig(data []byte) (Config, error) {
	var hf hfConfig
	hf.NumKVHeads = -1
	hf.RMSNormEps, hf.RopeTheta = 1e-6, 10000 // Hugging Face's LlamaConfig defaults
	if err := json.Unmarshal(data, &hf); err != nil {
		return Config{}, fmt.Errorf("llama: config.json: %w", err)
	}
	if hf.ModelType != "" && hf.ModelType != "llama" {
		return Config{}, fmt.Errorf("llama: config.json: unsupported model_type %q (want \"llama\")", hf.ModelType)
	}
	for _, arch := range hf.Architectures {
		if arch != "LlamaForCausalLM" && arch != "LlamaForSequenceClassification" && arch != "LlamaModel" {
			return Config{}, fmt.Errorf("llama: config.json: unsupported architecture %q", arch)
		}
	}
	if hf.HiddenAct != "" && hf.HiddenAct != "silu" {
		return Config{}, fmt.Errorf("llama: config.json: unsupported hidden_act %q (want \"silu\")", hf.HiddenAct)
	}
	if hf.RopeScaling != nil && string(*hf.RopeScaling) != "null" {
		return Config{}, fmt.Errorf("llama: config.json: rope_scaling %s is not supported", *hf.RopeScaling)
	}
	if hf.AttentionBias || hf.MLPBias {
		return Config{}, fmt.Errorf("llama: config.json: attention_bias and mlp_bias are not supported")
	}
	cfg := hf.Config
	if cfg.NumKVHeads == -1 {
		cfg.NumKVHeads = cfg.NumHeads // Hugging Face's default: no grouping
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	if hf.HeadDim != 0 && hf.HeadDim != cfg.HeadDim() {
		return Config{}, fmt.Errorf("llama: config.json: head_dim %d differs from hidden_size/num_attention_heads = %d",
			hf.HeadDim, cfg.HeadDim())
	}
	return cfg, nil
}

// hfTensor maps one Hugging Face tensor to one of our variables.
type hfTensor struct {
	name      string // Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
	scope     string // our variable's scope
	variable  string // our variable's name
	dims      []int  // Hugging Face's shape
	transpose bool   // [out, in] there, [in, out] here
}

// hfTensors lists the tensors of a Llama checkpoint with cfg, in a stable order.
func hfTensors(cfg Config) []hfTensor {
	d, hd := cfg.HiddenSize, cfg.HeadDim()
	var out []hfTensor
	add := func(name string, transpose bool, dims ...int) {
		base := strings.TrimSuffix(name, ".weight")
		scope := "/" + strings.ReplaceAll(base, ".", "/")
		variable := "weight"
		switch {
		case base == "model.embed_tokens":
			variable = "embeddings"
		case transpose:
			scope, variable = scope+"/dense", "weights"
		}
		out = append(out, hfTensor{name: name, scope: scope, variable: variable, dims: dims, transpose: transpose})
	}
	add("model.embed_tokens.weight", false, cfg.VocabSize, d)
	for i := range cfg.NumLayers {
		p := "model.layers." + strconv.Itoa(i) + "."
		add(p+"input_layernorm.weight", false, d)
		add(p+"self_attn.q_proj.weight", true, cfg.NumHeads*hd, d)
		add(p+"self_attn.k_proj.weight", true, cfg.NumKVHeads*hd, d)
		add(p+"self_attn.v_proj.weight", true, cfg.NumKVHeads*hd, d)
		add(p+"self_attn.o_proj.weight", true, d, cfg.NumHeads*hd)
		add(p+"post_attention_layernorm.weight", false, d)
		add(p+"mlp.gate_proj.weight", true, cfg.IntermediateSize, d)
		add(p+"mlp.up_proj.weight", true, cfg.IntermediateSize, d)
		add(p+"mlp.down_proj.weight", true, d, cfg.IntermediateSize)
	}
	add("model.norm.weight", false, d)
	if !cfg.TieEmbeddings {
		add("lm_head.weight", true, cfg.VocabSize, d)
	}
	return out
}

// LoadPretrained reads a Hugging Face Llama folder (config.json and model.safetensors, or shards
// listed in model.safetensors.index.json) into ctx and returns its configuration. PyTorch's
// [out, in] weights are transposed to our [in, out]; F32, F16 and BF16 tensors are read as
// float32. Every tensor the configuration implies must be present with the implied shape;
// missing or unexpected tensors and shape mismatches are errors that name the tensor. With tied
// embeddings, an lm_head.weight in the file must equal the embeddings. Variables already in ctx
// are overwritten. The folder and its config.json are recorded as the context's base model
// (peft.SetBaseModel), which saved adapters name; LoadPretrainedFS records no name.
func LoadPretrained(ctx *context.Context, dir string) (Config, error) {
	cfg, err := LoadPretrainedFS(ctx, os.DirFS(dir))
	if err == nil {
		peft.NameBaseModel(ctx, dir)
	}
	return cfg, err
}

// LoadPretrainedFS is LoadPretrained from a file system (such as an embedded model).
func LoadPretrainedFS(ctx *context.Context, fsys fs.FS) (Config, error) {
	data, err := fs.ReadFile(fsys, "config.json")
	if err != nil {
		return Config{}, fmt.Errorf("llama: no config.json: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, err
	}
	found, err := readWeights(fsys)
	if err != nil {
		return Config{}, err
	}
	values := map[string][]float32{}
	expected := hfTensors(cfg)
	for _, want := range expected {
		st, ok := found[want.name]
		if !ok {
			return Config{}, fmt.Errorf("llama: tensor %s is missing from the checkpoint", want.name)
		}
		if !slices.Equal(st.Shape, want.dims) {
			return Config{}, fmt.Errorf("llama: tensor %s has shape %v, config.json implies %v", want.name, st.Shape, want.dims)
		}
		v, err := st.Float32s()
		if err != nil {
			return Config{}, fmt.Errorf("llama: tensor %s: %w", want.name, err)
		}
		values[want.name] = v
		delete(found, want.name)
	}
	if head, ok := found["lm_head.weight"]; ok && cfg.TieEmbeddings {
		v, err := head.Float32s()
		if err != nil || !slices.Equal(head.Shape, []int{cfg.VocabSize, cfg.HiddenSize}) || !slices.Equal(v, values["model.embed_tokens.weight"]) {
			return Config{}, fmt.Errorf("llama: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
		}
		delete(found, "lm_head.weight")
	}
	var unexpected []string
	for name := range found {
		if !strings.HasSuffix(name, ".rotary_emb.inv_freq") { // a buffer older exports carry
			unexpected = append(unexpected, name)
		}
	}
	if len(unexpected) > 0 {
		sort.Strings(unexpected)
		return Config{}, fmt.Errorf("llama: unexpected tensors in the checkpoint (is it a Llama model?): %s", strings.Join(unexpected, ", "))
	}
	for _, t := range expected {
		v := values[t.name]
		dims := t.dims
		if t.transpose {
			v, dims = peft.Transpose(v, dims[0], dims[1]), []int{dims[1], dims[0]}
		}
		scope := ctx.InAbsPath(t.scope)
		if existing := scope.GetVariableByScopeAndName(t.scope, t.variable); existing != nil {
			if err := peft.SetFloat32s(existing, v); err != nil {
				return Config{}, fmt.Errorf("llama: %s: %w", t.name, err)
			}
			continue
		}
		peft.NewVariable(scope, t.variable, v, dims...)
	}
	peft.SetBaseModel(ctx, peft.BaseModel{Config: data})
	return cfg, nil
}

// readWeights reads model.safetensors, or the shards model.safetensors.index.json lists.
func readWeights(fsys fs.FS) (map[string]*safetensors.Tensor, error) {
	files := []string{"model.safetensors"}
	if index, err := fs.ReadFile(fsys, "model.safetensors.index.json"); err == nil {
		var idx struct {
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(index, &idx); err != nil {
			return nil, fmt.Errorf("llama: model.safetensors.index.json: %w", err)
		}
		files = files[:0]
		for _, file := range idx.WeightMap {
			if path.Base(file) != file || file == "." || file == ".." {
				return nil, fmt.Errorf("llama: model.safetensors.index.json names a shard outside the folder: %q", file)
			}
			if !slices.Contains(files, file) {
				files = append(files, file)
			}
		}
		sort.Strings(files)
		if len(files) == 0 {
			return nil, errors.New("llama: model.safetensors.index.json lists no shards")
		}
	}
	found := map[string]*safetensors.Tensor{}
	for _, file := range files {
		data, err := fs.ReadFile(fsys, file)
		if err != nil {
			return nil, fmt.Errorf("llama: no weights: %w", err)
		}
		parsed, err := safetensors.Parse(data)
		if err != nil {
			return nil, fmt.Errorf("llama: %s: %w", file, err)
		}
		for i := range parsed.Tensors {
			t := &parsed.Tensors[i]
			if _, dup := found[t.Name]; dup {
				return nil, fmt.Errorf("llama: tensor %s appears in more than one shard", t.Name)
			}
			found[t.Name] = t
		}
	}
	return found, nil
}

// SaveHF writes the Llama model in ctx as a standard Hugging Face folder that this package and
// Hugging Face transformers load: config.json and model.safetensors (Hugging Face names, [out,
// in] layout, F32). Files named in copyFiles (such as tokenizer.json) are copied from from
// (such as the base model's folder, os.DirFS(dir)), when it is not nil. Each file is written
// atomically. Use it after peft.Model.Merge to export a fine-tuned model: a model applied to ctx
// whose fine-tune lives outside the base weights (an unmerged LoRA, adapters, prompt tuning) is
// an error (peft.CheckExport), as the written model would silently lack it.
func SaveHF(dir string, cfg Config, ctx *context.Context, from fs.FS, copyFiles ...string) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := peft.CheckExport(ctx); err != nil {
		return fmt.Errorf("llama.SaveHF: %w", err)
	}
	var out []safetensors.Tensor
	for _, t := range hfTensors(cfg) {
		v := ctx.GetVariableByScopeAndName(t.scope, t.variable)
		if v == nil {
			return fmt.Errorf("llama.SaveHF: the model has no variable %s/%s for %s", t.scope, t.variable, t.name)
		}
		values, err := peft.Float32s(v)
		if err != nil {
			return fmt.Errorf("llama.SaveHF: %s: %w", t.name, err)
		}
		if t.transpose {
			values = peft.Transpose(values, t.dims[1], t.dims[0])
		}
		if !slices.Equal(v.Shape().Dimensions, hfVariableDims(t)) {
			return fmt.Errorf("llama.SaveHF: variable %s has shape %v, config implies %v", v.ScopeAndName(), v.Shape().Dimensions, hfVariableDims(t))
		}
		out = append(out, safetensors.FromFloat32(t.name, t.dims, values))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, name := range copyFiles {
		if from == nil {
			break
		}
		data, err := fs.ReadFile(from, name)
		if err != nil {
			return fmt.Errorf("llama.SaveHF: %w", err)
		}
		if err := atomicfile.Write(filepath.Join(dir, name), data); err != nil {
			return fmt.Errorf("llama.SaveHF: %w", err)
		}
	}
	if err := safetensors.Write(filepath.Join(dir, "model.safetensors"), out, map[string]string{"format": "pt"}); err != nil {
		return fmt.Errorf("llama.SaveHF: %w", err)
	}
	data, err := hfConfigJSON(cfg)
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, "config.json"), data)
}

// hfConfigJSON is the config.json of a Llama model with cfg, as SaveHF writes it.
func hfConfigJSON(cfg Config) ([]byte, error) {
	hf := hfConfig{Config: cfg, Architectures: []string{"LlamaForCausalLM"}, ModelType: "llama", HiddenAct: "silu", HeadDim: cfg.HeadDim()}
	data, err := json.MarshalIndent(struct {
		hfConfig
		TorchDType string `json:"torch_dtype"`
	}{hf, "float32"}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// hfVariableDims is the shape of our variable for a Hugging Face tensor.
func hfVariableDims(t hfTensor) []int {
	if t.transpose {
		return []int{t.dims[1], t.dims[0]}
	}
	return t.dims
}
