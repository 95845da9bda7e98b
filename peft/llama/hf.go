package llama

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/atomicfile"
	"peft/peft/files"
	"peft/peft/safetensors"
)

// hfConfig is the part of a Hugging Face config.json we read beyond Config's own fields.
type hfConfig struct {
	Config
	Architectures []string `json:"architectures"`
	HiddenAct     string   `json:"hidden_act"`
	// RopeScaling and RopeTheta shadow Config's fields, to be read with parseRopeScaling or
	// from transformers v5's rope_parameters, which holds both.
	RopeScaling    json.RawMessage `json:"rope_scaling"`
	RopeTheta      json.RawMessage `json:"rope_theta"`
	RopeParameters json.RawMessage `json:"rope_parameters"`
	// HeadDim and NumKVHeads shadow Config's fields: their defaults depend on the family.
	HeadDim    *int `json:"head_dim"`
	NumKVHeads *int `json:"num_key_value_heads"`
	// UseSlidingWindow and MaxWindowLayers are Qwen2's and Qwen3's; SlidingWindow shadows
	// Config's, which holds it only where the family uses it (Mistral).
	UseSlidingWindow bool            `json:"use_sliding_window"`
	SlidingWindow    json.RawMessage `json:"sliding_window"`
	// LayerTypes is newer transformers' per-layer attention kind; only "full_attention" runs here.
	LayerTypes []string `json:"layer_types"`
	// PartialRotaryFactor, when not 1, rotates only part of each head (not implemented).
	PartialRotaryFactor *float64 `json:"partial_rotary_factor"`
}

// mistralDefaultWindow is MistralConfig's sliding_window when config.json does not give one.
const mistralDefaultWindow = 4096

// familyDefaults are the defaults of transformers' config classes that differ between the
// families, for fields config.json leaves out (0: Llama's, num_attention_heads and
// hidden/heads).
var familyDefaults = map[string]struct{ numKVHeads, headDim int }{
	FamilyMistral: {numKVHeads: 8},
	FamilyQwen2:   {numKVHeads: 32},
	FamilyQwen3:   {numKVHeads: 32, headDim: 128},
}

// parseRope reads rope_theta and rope_scaling, or transformers v5's rope_parameters (which holds
// both; a config with both forms must agree). rope_theta defaults to 10000, every family's
// default.
func parseRope(thetaRaw, scalingRaw, paramsRaw json.RawMessage) (float64, *RopeScaling, error) {
	theta := 10000.0
	if len(thetaRaw) > 0 {
		var t *float64
		if err := json.Unmarshal(thetaRaw, &t); err != nil {
			return 0, nil, fmt.Errorf("llama: config.json: rope_theta: %w", err)
		}
		if t == nil && len(paramsRaw) == 0 {
			return 0, nil, fmt.Errorf("llama: config.json: rope_theta is null and there are no rope_parameters")
		}
		if t != nil {
			theta = *t
		}
	}
	scaling, err := parseRopeScaling(scalingRaw)
	if err != nil || len(paramsRaw) == 0 || string(bytes.TrimSpace(paramsRaw)) == "null" {
		return theta, scaling, err
	}
	var params struct {
		RopeTheta *float64 `json:"rope_theta"`
	}
	if err := json.Unmarshal(paramsRaw, &params); err != nil || params.RopeTheta == nil {
		return 0, nil, fmt.Errorf("llama: config.json: rope_parameters must be an object with rope_theta, got %s", truncate(paramsRaw))
	}
	fromParams, err := parseRopeScaling(paramsRaw)
	if err != nil {
		return 0, nil, fmt.Errorf("%w (in rope_parameters)", err)
	}
	if len(thetaRaw) > 0 && string(bytes.TrimSpace(thetaRaw)) != "null" && theta != *params.RopeTheta {
		return 0, nil, fmt.Errorf("llama: config.json: rope_theta %g disagrees with rope_parameters.rope_theta %g", theta, *params.RopeTheta)
	}
	if scaling != nil && !reflect.DeepEqual(scaling, fromParams) {
		return 0, nil, fmt.Errorf("llama: config.json: rope_scaling disagrees with rope_parameters")
	}
	return *params.RopeTheta, fromParams, nil
}

func truncate(raw []byte) string {
	if len(raw) > 120 {
		return string(raw[:120]) + "…"
	}
	return string(raw)
}

// architectures lists the transformers classes of each family that this decoder runs.
var architectures = map[string][]string{
	FamilyLlama:   {"LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel"},
	FamilyMistral: {"MistralForCausalLM", "MistralForSequenceClassification", "MistralModel"},
	FamilyQwen2:   {"Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model"},
	FamilyQwen3:   {"Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen3Model"},
}

// ParseConfig reads a Hugging Face config.json of the Llama family or a relative (model_type
// llama, mistral, qwen2, qwen3), in transformers' semantics: head_dim, attention_bias and
// mlp_bias (Llama), Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's sliding_window,
// rope_scaling of rope_type linear or llama3, eos_token_id as one id or a list. Anything else that
// would change the math (another model_type or rope_type, an activation other than SiLU, Qwen's
// use_sliding_window, biases a family does not have) is an error that names the field.
func ParseConfig(data []byte) (Config, error) {
	var hf hfConfig
	hf.RMSNormEps = 1e-6 // every family's default
	if err := json.Unmarshal(data, &hf); err != nil {
		return Config{}, fmt.Errorf("llama: config.json: %w", err)
	}
	if hf.ModelType == "" {
		hf.ModelType = FamilyLlama
	}
	known, ok := architectures[hf.ModelType]
	if !ok {
		return Config{}, fmt.Errorf("llama: config.json: unsupported model_type %q (supported: llama, mistral, qwen2, qwen3)", hf.ModelType)
	}
	for _, arch := range hf.Architectures {
		if !slices.Contains(known, arch) {
			return Config{}, fmt.Errorf("llama: config.json: unsupported architecture %q for model_type %q", arch, hf.ModelType)
		}
	}
	if hf.HiddenAct != "" && hf.HiddenAct != "silu" {
		return Config{}, fmt.Errorf("llama: config.json: unsupported hidden_act %q (want \"silu\")", hf.HiddenAct)
	}
	theta, scaling, err := parseRope(hf.RopeTheta, hf.RopeScaling, hf.RopeParameters)
	if err != nil {
		return Config{}, err
	}
	if f := hf.PartialRotaryFactor; f != nil && *f != 1 {
		return Config{}, fmt.Errorf("llama: config.json: partial_rotary_factor %g is not supported (only 1)", *f)
	}
	for i, kind := range hf.LayerTypes {
		if kind != "full_attention" {
			return Config{}, fmt.Errorf("llama: config.json: layer_types[%d] is %q; only full_attention is supported", i, kind)
		}
	}
	cfg := hf.Config
	cfg.RopeTheta, cfg.RopeScaling = theta, scaling
	switch cfg.ModelType {
	case FamilyMistral:
		// Absent means MistralConfig's default; null means no window.
		cfg.SlidingWindow = mistralDefaultWindow
		if hf.SlidingWindow != nil {
			var window *int
			if err := json.Unmarshal(hf.SlidingWindow, &window); err != nil {
				return Config{}, fmt.Errorf("llama: config.json: sliding_window: %w", err)
			}
			cfg.SlidingWindow = 0
			if window != nil {
				cfg.SlidingWindow = *window
			}
		}
		if cfg.AttentionBias || cfg.MLPBias {
			return Config{}, fmt.Errorf("llama: config.json: attention_bias and mlp_bias are not part of model_type mistral")
		}
	case FamilyQwen2, FamilyQwen3:
		if hf.UseSlidingWindow {
			return Config{}, fmt.Errorf("llama: config.json: use_sliding_window is not supported for model_type %s", cfg.ModelType)
		}
		if cfg.MLPBias || (cfg.ModelType == FamilyQwen2 && cfg.AttentionBias) {
			return Config{}, fmt.Errorf("llama: config.json: attention_bias and mlp_bias are not part of model_type %s (Qwen2 has its q, k, v biases by itself)", cfg.ModelType)
		}
	}
	// The defaults of the family's config class for what config.json leaves out.
	defaults := familyDefaults[cfg.ModelType]
	cfg.NumKVHeads = cfg.NumHeads // Llama's: no grouping
	if defaults.numKVHeads > 0 {
		cfg.NumKVHeads = defaults.numKVHeads
	}
	if hf.NumKVHeads != nil {
		cfg.NumKVHeads = *hf.NumKVHeads
	}
	cfg.HeadDimension = defaults.headDim
	if hf.HeadDim != nil {
		cfg.HeadDimension = *hf.HeadDim
	}
	if cfg.HeadDimension == cfg.HiddenSize/max(cfg.NumHeads, 1) && cfg.HiddenSize%max(cfg.NumHeads, 1) == 0 {
		cfg.HeadDimension = 0 // hidden/heads, said explicitly
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
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

// hfTensors lists the tensors of a checkpoint with cfg (its family's biases and norms included),
// in a stable order.
func hfTensors(cfg Config) []hfTensor {
	d, hd := cfg.HiddenSize, cfg.HeadDim()
	fam := cfg.Family()
	var out []hfTensor
	add := func(name string, transpose bool, dims ...int) {
		base, variable := strings.TrimSuffix(name, ".weight"), "weight"
		bias := strings.HasSuffix(name, ".bias")
		if bias {
			base = strings.TrimSuffix(name, ".bias")
		}
		scope := "/" + strings.ReplaceAll(base, ".", "/")
		switch {
		case base == "model.embed_tokens":
			variable = "embeddings"
		case bias:
			scope, variable = scope+"/dense", "biases"
		case transpose:
			scope, variable = scope+"/dense", "weights"
		}
		out = append(out, hfTensor{name: name, scope: scope, variable: variable, dims: dims, transpose: transpose})
	}
	linear := func(name string, outDim, inDim int, bias bool) {
		add(name+".weight", true, outDim, inDim)
		if bias {
			add(name+".bias", false, outDim)
		}
	}
	add("model.embed_tokens.weight", false, cfg.VocabSize, d)
	for i := range cfg.NumLayers {
		p := "model.layers." + strconv.Itoa(i) + "."
		add(p+"input_layernorm.weight", false, d)
		linear(p+"self_attn.q_proj", cfg.NumHeads*hd, d, fam.QKVBias)
		linear(p+"self_attn.k_proj", cfg.NumKVHeads*hd, d, fam.QKVBias)
		linear(p+"self_attn.v_proj", cfg.NumKVHeads*hd, d, fam.QKVBias)
		linear(p+"self_attn.o_proj", d, cfg.NumHeads*hd, fam.OBias)
		if fam.QKNorm {
			add(p+"self_attn.q_norm.weight", false, hd)
			add(p+"self_attn.k_norm.weight", false, hd)
		}
		add(p+"post_attention_layernorm.weight", false, d)
		linear(p+"mlp.gate_proj", cfg.IntermediateSize, d, fam.MLPBias)
		linear(p+"mlp.up_proj", cfg.IntermediateSize, d, fam.MLPBias)
		linear(p+"mlp.down_proj", d, cfg.IntermediateSize, fam.MLPBias)
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
	_ = atomicfile.Complete(dir) // move a SaveHF cut short after its commit into place, where the folder is writable
	cfg, err := LoadPretrainedFS(ctx, os.DirFS(dir))
	if err == nil {
		peft.NameBaseModel(ctx, dir)
	}
	return cfg, err
}

// LoadPretrainedFS is LoadPretrained from a file system (such as an embedded model).
func LoadPretrainedFS(ctx *context.Context, fsys fs.FS) (Config, error) {
	data, err := files.Read(fsys, "config.json", files.MaxConfig)
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
	// A context that already holds the model must take every tensor, or it is left unchanged.
	for _, t := range expected {
		if existing := ctx.GetVariableByScopeAndName(t.scope, t.variable); existing != nil &&
			(existing.Shape().DType != dtypes.Float32 || !slices.Equal(existing.Shape().Dimensions, hfVariableDims(t))) {
			return Config{}, fmt.Errorf("llama: the context already holds %s as %s, the checkpoint's %s is %v: load into a new context",
				existing.ScopeAndName(), existing.Shape(), t.name, hfVariableDims(t))
		}
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
	shards, err := files.Shards(fsys)
	if err != nil {
		return nil, fmt.Errorf("llama: %w", err)
	}
	found := map[string]*safetensors.Tensor{}
	for _, file := range shards {
		data, err := files.Read(fsys, file, files.Any)
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

// SaveHF writes the model in ctx as a standard Hugging Face folder of its family that this package and
// Hugging Face transformers load: config.json and model.safetensors (Hugging Face names, [out,
// in] layout, F32). Files named in copyFiles (such as tokenizer.json) are copied from from
// (such as the base model's folder, os.DirFS(dir)), when it is not nil. The files are replaced as
// one change (atomicfile.WriteFiles): a save killed at any instant leaves the old model or the
// new one. Use it after peft.Model.Merge to export a fine-tuned model: a model applied to ctx
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
	data, err := hfConfigJSON(cfg)
	if err != nil {
		return err
	}
	if err := peft.WriteModelFolder(dir, out, data, from, copyFiles...); err != nil {
		return fmt.Errorf("llama.SaveHF: %w", err)
	}
	return nil
}

// HFConfig returns the fields of the config.json of a model with configuration c, as SaveHF
// writes it: the family's model_type and architecture, head_dim, the family's own fields,
// torch_dtype float32. It makes Config a peft.HFModelConfig, which checkpoint writers that know
// no model family (qlora.SaveQuantized) take.
func (c Config) HFConfig() (map[string]any, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	cfg := c
	if cfg.ModelType == "" {
		cfg.ModelType = FamilyLlama
	}
	data, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	fields := map[string]any{}
	if err := json.Unmarshal(data, &fields); err != nil {
		return nil, err
	}
	fields["architectures"] = []string{cfg.Family().Architecture}
	fields["hidden_act"] = "silu"
	fields["head_dim"] = cfg.HeadDim()
	fields["rope_scaling"] = cfg.RopeScaling
	fields["torch_dtype"] = "float32"
	switch cfg.ModelType {
	case FamilyLlama:
		fields["attention_bias"], fields["mlp_bias"] = cfg.AttentionBias, cfg.MLPBias
	case FamilyQwen3:
		fields["attention_bias"] = cfg.AttentionBias
		fields["use_sliding_window"] = false
	case FamilyQwen2:
		fields["use_sliding_window"] = false
	case FamilyMistral:
		fields["sliding_window"] = nil
		if cfg.SlidingWindow > 0 {
			fields["sliding_window"] = cfg.SlidingWindow
		}
	}
	return fields, nil
}

// hfConfigJSON is the config.json of a model with cfg, as SaveHF writes it.
func hfConfigJSON(cfg Config) ([]byte, error) {
	fields, err := cfg.HFConfig()
	if err != nil {
		return nil, err
	}
	return peft.ConfigJSON(fields)
}

// hfVariableDims is the shape of our variable for a Hugging Face tensor.
func hfVariableDims(t hfTensor) []int {
	if t.transpose {
		return []int{t.dims[1], t.dims[0]}
	}
	return t.dims
}
