package prefixtuning

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/safetensors"
)

// Hugging Face PEFT's layout of a prefix-tuning adapter (peft.PEFTFormat):
//
//	adapter_config.json: peft_type "PREFIX_TUNING", num_virtual_tokens, token_dim (kvHeads ·
//	  headDim, PEFT's grouped-query rewrite), num_transformer_submodules 1 (a decoder),
//	  num_attention_heads (kvHeads, the same rewrite), num_layers, encoder_hidden_size (token_dim
//	  unless set: PEFT fills it so), prefix_projection, and modules_to_save when there are any
//	  (PEFT's prompt-learning configs have it since 0.17, and PEFT before 0.14 fails on fields it
//	  does not know; for the same reason PEFT's newer init_weights is not written).
//	adapter_model.safetensors: prompt_embeddings [num_virtual_tokens, num_layers·2·token_dim],
//	  the computed prefix even with prefix_projection (get_prompt_embedding_to_save); modules to
//	  save as base_model.<module>.weight (prompt learning wraps the model once).

// PEFTType implements peft.PEFTFormat.
func (p *PrefixTuning) PEFTType() string { return "PREFIX_TUNING" }

// PEFTConfig implements peft.PEFTFormat.
func (p *PrefixTuning) PEFTConfig(*context.Context) (map[string]any, error) {
	fields := map[string]any{
		"num_virtual_tokens": p.cfg.NumVirtualTokens, "token_dim": p.tokenDim,
		"num_transformer_submodules": 1, "num_attention_heads": p.kvHeads, "num_layers": p.numLayers,
		"encoder_hidden_size": p.encoder, "prefix_projection": p.cfg.PrefixProjection,
	}
	if len(p.cfg.ModulesToSave) > 0 {
		// PEFT's prompt-learning configs have this field since 0.17 only: write it when used.
		fields["modules_to_save"] = p.cfg.ModulesToSave
	}
	return fields, nil
}

// ParsePEFTConfig builds the prefix-tuning configuration of a PEFT adapter_config.json
// (peft_type PREFIX_TUNING) for loading the adapter: with prefix_projection it is in
// InferenceMode, since the file holds the computed prefix and not the MLP (PEFT loads it so too).
// num_transformer_submodules other than 1 (encoder-decoder models) is refused; token_dim,
// num_attention_heads and num_layers are checked against the model when the adapter is loaded.
func ParsePEFTConfig(fields *peft.PEFTFields) (Config, error) {
	c := DefaultConfig()
	if err := fields.Get("num_virtual_tokens", &c.NumVirtualTokens); err != nil {
		return Config{}, err
	}
	if err := fields.Get("prefix_projection", &c.PrefixProjection); err != nil {
		return Config{}, err
	}
	var hidden int
	if err := fields.Get("encoder_hidden_size", &hidden); err != nil {
		return Config{}, err
	}
	if c.PrefixProjection {
		c.EncoderHiddenSize, c.InferenceMode = hidden, true
	}
	var err error
	if c.ModulesToSave, err = peft.ReadPromptLearningFields(fields); err != nil {
		return Config{}, fmt.Errorf("prefix_tuning: %w", err)
	}
	// init_weights only initializes; the sizes are checked with the model in CheckPEFTConfig.
	fields.Ignore("token_dim", "num_attention_heads", "num_layers", "init_weights")
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", fields.Source(), err)
	}
	return c, nil
}

// CheckPEFTConfig implements peft.PEFTFormat: the file must have the model's sizes (token_dim
// kvHeads·headDim, num_attention_heads kvHeads, num_layers), the method's number of virtual tokens,
// prefix_projection and modules to save, and a method training the projection MLP cannot load
// the computed prefix a file holds (build it with NewForInference).
func (p *PrefixTuning) CheckPEFTConfig(fields *peft.PEFTFields) error {
	c, err := ParsePEFTConfig(fields)
	if err != nil {
		return err
	}
	src := fields.Source()
	if p.projects() {
		return fmt.Errorf("prefix_tuning: %s holds the computed prefix, which cannot be loaded into the prefix_projection MLP that computes it: build the method with NewForInference (InferenceMode) to run the adapter, or resume training from a trainer checkpoint", src)
	}
	for _, f := range []struct {
		key       string
		want      int
		condition string
	}{
		{"token_dim", p.tokenDim, fmt.Sprintf("kv heads × head width = %d × %d, PEFT's rewrite for grouped-query attention", p.kvHeads, p.headDim)},
		{"num_attention_heads", p.kvHeads, "the model's key/value heads, PEFT's rewrite for grouped-query attention"},
		{"num_layers", p.numLayers, "the model's attention layers"},
	} {
		var got int
		if err := fields.Get(f.key, &got); err != nil {
			return err
		}
		if fields.Has(f.key) && got != f.want {
			return fmt.Errorf("prefix_tuning: %s: %s %d, the model needs %d (%s)", src, f.key, got, f.want, f.condition)
		}
	}
	if c.NumVirtualTokens != p.cfg.NumVirtualTokens {
		return fmt.Errorf("prefix_tuning: %s: num_virtual_tokens %d, the model's method has %d", src, c.NumVirtualTokens, p.cfg.NumVirtualTokens)
	}
	if c.PrefixProjection != p.cfg.PrefixProjection {
		return fmt.Errorf("prefix_tuning: %s: prefix_projection %t, the model's method has %t", src, c.PrefixProjection, p.cfg.PrefixProjection)
	}
	if err := peft.SameModules(p.layout, p.modules, c.ModulesToSave, src); err != nil {
		return fmt.Errorf("prefix_tuning: %w", err)
	}
	return nil
}

// PEFTTensors implements peft.PEFTFormat: the computed prefix and the modules to save.
func (p *PrefixTuning) PEFTTensors(*context.Context) ([]safetensors.Tensor, error) {
	values, err := p.PrefixValues()
	if err != nil {
		return nil, err
	}
	out := []safetensors.Tensor{safetensors.FromFloat32(PrefixName, []int{p.cfg.NumVirtualTokens, p.width()}, values)}
	modules, err := peft.HFTensors(peft.PromptLearningPrefix, p.modules)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}

// PEFTValues implements peft.PEFTFormat.
func (p *PrefixTuning) PEFTValues(_ *context.Context, _ *peft.PEFTFields, file *peft.PEFTTensorFile) ([]*tensors.Tensor, error) {
	if p.projects() {
		return nil, fmt.Errorf("prefix_tuning: a method training the prefix_projection MLP cannot load a saved prefix: build it with NewForInference")
	}
	dims := []int{p.cfg.NumVirtualTokens, p.width()}
	values, err := file.Take(PrefixName, dims...)
	if err != nil {
		return nil, err
	}
	modules, err := peft.HFValues(peft.PromptLearningPrefix, p.modules, file)
	if err != nil {
		return nil, err
	}
	return append([]*tensors.Tensor{tensors.FromFlatDataAndDimensions(values, dims...)}, modules...), nil
}
