package prompttuning

import (
	"encoding/json"
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/safetensors"
)

// Hugging Face PEFT's layout of a prompt-tuning adapter (peft.PEFTFormat):
//
//	adapter_config.json: peft_type "PROMPT_TUNING", num_virtual_tokens, token_dim,
//	  num_transformer_submodules 1 (a decoder), num_attention_heads and num_layers (from the base
//	  model's config.json when known), prompt_tuning_init "RANDOM" or "SAMPLE_VOCAB", and
//	  modules_to_save when there are any (PEFT's prompt-learning configs have it since 0.17, and
//	  PEFT before 0.14 fails on fields it does not know).
//	  Our text initialization (token ids) is written as "RANDOM": PEFT's "TEXT" needs a tokenizer
//	  and the text, which we do not have, and the initialization does not matter once trained.
//	adapter_model.safetensors: prompt_embeddings [num_virtual_tokens, token_dim] without prefix;
//	  modules to save as base_model.<module>.weight (prompt learning wraps the model once).
//
// PEFT prepends the virtual tokens as we do (positions 0…k−1, the real tokens after them); its
// causal-LM logits keep the k virtual positions, which ours drop.

// PEFTType implements peft.PEFTFormat.
func (p *PromptTuning) PEFTType() string { return "PROMPT_TUNING" }

// PEFTConfig implements peft.PEFTFormat.
func (p *PromptTuning) PEFTConfig(ctx *context.Context) (map[string]any, error) {
	init := "RANDOM"
	if p.cfg.Init == InitVocab {
		init = "SAMPLE_VOCAB"
	}
	var heads any
	var base struct {
		NumHeads int `json:"num_attention_heads"`
	}
	if cfg := peft.BaseModelOf(ctx).Config; cfg != nil && json.Unmarshal(cfg, &base) == nil && base.NumHeads > 0 {
		heads = base.NumHeads
	}
	fields := map[string]any{
		"num_virtual_tokens": p.cfg.NumVirtualTokens, "token_dim": p.prompt.Shape().Dim(1),
		"num_transformer_submodules": 1, "num_attention_heads": heads, "num_layers": p.numLayers,
		"prompt_tuning_init": init, "prompt_tuning_init_text": nil, "tokenizer_name_or_path": nil,
		"tokenizer_kwargs": nil,
	}
	if len(p.cfg.ModulesToSave) > 0 {
		// PEFT's prompt-learning configs have this field since 0.17 only: write it when used.
		fields["modules_to_save"] = p.cfg.ModulesToSave
	}
	return fields, nil
}

// ParsePEFTConfig builds the prompt-tuning configuration of a PEFT adapter_config.json
// (peft_type PROMPT_TUNING). "RANDOM" becomes InitRandom and "SAMPLE_VOCAB" InitVocab; "TEXT"
// becomes InitRandom too, as we have no tokenizer here (a loaded adapter replaces the
// initialization anyway). num_transformer_submodules other than 1 (encoder-decoder models) is
// refused.
func ParsePEFTConfig(fields *peft.PEFTFields) (Config, error) {
	c := DefaultConfig()
	var init string
	if err := fields.Get("num_virtual_tokens", &c.NumVirtualTokens); err != nil {
		return Config{}, err
	}
	if err := fields.Get("prompt_tuning_init", &init); err != nil {
		return Config{}, err
	}
	switch init {
	case "", "RANDOM", "TEXT":
		c.Init = InitRandom
	case "SAMPLE_VOCAB":
		c.Init = InitVocab
	default:
		return Config{}, fmt.Errorf("prompt_tuning: %s: field \"prompt_tuning_init\" = %q is not one of RANDOM, SAMPLE_VOCAB, TEXT", fields.Source(), init)
	}
	var err error
	if c.ModulesToSave, err = peft.ReadPromptLearningFields(fields); err != nil {
		return Config{}, fmt.Errorf("prompt_tuning: %w", err)
	}
	// token_dim is checked against the model with the tensors; the rest is initialization or
	// informational.
	fields.Ignore("token_dim", "num_attention_heads", "num_layers", "prompt_tuning_init_text",
		"tokenizer_name_or_path", "tokenizer_kwargs")
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", fields.Source(), err)
	}
	return c, nil
}

// CheckPEFTConfig implements peft.PEFTFormat: the file must give the same number of virtual
// tokens, the model's width as token_dim and the same modules to save.
func (p *PromptTuning) CheckPEFTConfig(fields *peft.PEFTFields) error {
	c, err := ParsePEFTConfig(fields)
	if err != nil {
		return err
	}
	var dim int
	if err := fields.Get("token_dim", &dim); err != nil {
		return err
	}
	if want := p.prompt.Shape().Dim(1); dim != 0 && dim != want {
		return fmt.Errorf("prompt_tuning: %s: token_dim %d, the model's inputs are %d wide", fields.Source(), dim, want)
	}
	if c.NumVirtualTokens != p.cfg.NumVirtualTokens {
		return fmt.Errorf("prompt_tuning: %s: num_virtual_tokens %d, the model's method has %d", fields.Source(), c.NumVirtualTokens, p.cfg.NumVirtualTokens)
	}
	if err := peft.SameModules(p.layout, p.modules, c.ModulesToSave, fields.Source()); err != nil {
		return fmt.Errorf("prompt_tuning: %w", err)
	}
	return nil
}

// PEFTTensors implements peft.PEFTFormat.
func (p *PromptTuning) PEFTTensors(*context.Context) ([]safetensors.Tensor, error) {
	values, err := peft.Float32s(p.prompt)
	if err != nil {
		return nil, err
	}
	out := []safetensors.Tensor{safetensors.FromFloat32(VariableName, p.prompt.Shape().Dimensions, values)}
	modules, err := peft.HFTensors(peft.PromptLearningPrefix, p.modules)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}

// PEFTValues implements peft.PEFTFormat.
func (p *PromptTuning) PEFTValues(_ *context.Context, _ *peft.PEFTFields, file *peft.PEFTTensorFile) ([]*tensors.Tensor, error) {
	dims := p.prompt.Shape().Dimensions
	values, err := file.Take(VariableName, dims...)
	if err != nil {
		return nil, err
	}
	modules, err := peft.HFValues(peft.PromptLearningPrefix, p.modules, file)
	if err != nil {
		return nil, err
	}
	return append([]*tensors.Tensor{tensors.FromFlatDataAndDimensions(values, dims...)}, modules...), nil
}
