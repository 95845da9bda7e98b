package lora

import (
	"fmt"
	"math"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/safetensors"
)

// Hugging Face PEFT's layout of a LoRA adapter (peft.PEFTFormat):
//
//	adapter_config.json: peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, use_rslora,
//	  rank_pattern, alpha_pattern, modules_to_save, init_lora_weights (true for our InitKaiming,
//	  "gaussian"), use_dora, and PEFT's defaults for the fields of PEFT ≥ 0.10 that we do not use
//	  (bias "none", fan_in_fan_out false, layers_to_transform null, …). Fields PEFT added later
//	  are left out, so the file loads in every PEFT from 0.10 on (before 0.14 an unknown field is
//	  an error there).
//	adapter_model.safetensors: base_model.model.<path>.lora_A.weight [r, in] (Aᵀ) and
//	  .lora_B.weight [out, r] (Bᵀ) per adapted layer, with DoRA also .lora_magnitude_vector [out]
//	  (no ".weight": PEFT's key before and after its DoRA refactor); base_model.model.<module>.weight
//	  (and .bias) for modules_to_save, in PyTorch's layout.

// PEFTType implements peft.PEFTFormat.
func (l *LoRA) PEFTType() string { return "LORA" }

// PEFTConfig implements peft.PEFTFormat. rank_pattern and alpha_pattern are written resolved:
// one key per layer whose rank or alpha differs from r or lora_alpha, selecting that layer alone
// (peft.PEFTPatternKey), so that they mean the same under every PEFT version's matching rule and
// in any key order (PEFT sorts the keys when it saves a configuration again).
func (l *LoRA) PEFTConfig(*context.Context) (map[string]any, error) {
	c := l.cfg
	init := any(true)
	if c.InitA == InitGaussian {
		init = "gaussian"
	}
	rankPattern, alphaPattern := peft.Patterns[int]{}, peft.Patterns[any]{}
	for _, t := range l.order {
		rank, alpha, _ := c.Resolve(t.layer.Path)
		if rank == c.Rank && alpha == c.Alpha {
			continue
		}
		key, err := peft.PEFTPatternKey(l.layout, t.layer.Path)
		if err != nil {
			return nil, fmt.Errorf("lora: %w", err)
		}
		if rank != c.Rank {
			rankPattern = append(rankPattern, peft.Pattern[int]{Key: key, Value: rank})
		}
		if alpha != c.Alpha {
			alphaPattern = append(alphaPattern, peft.Pattern[any]{Key: key, Value: PEFTNumber(alpha)})
		}
	}
	fields := PEFTDefaults()
	for key, value := range map[string]any{
		"r": c.Rank, "lora_alpha": PEFTNumber(c.Alpha), "lora_dropout": c.Dropout,
		"target_modules": c.TargetModules, "use_rslora": c.UseRSLoRA, "rank_pattern": rankPattern,
		"alpha_pattern": alphaPattern, "modules_to_save": peft.ListOrNull(c.ModulesToSave),
		"init_lora_weights": init, "use_dora": c.UseDoRA,
	} {
		fields[key] = value
	}
	return fields, nil
}

// PEFTDefaults returns PEFT's defaults for the fields of its LoraConfig (which AdaLoraConfig
// extends) that PEFT 0.10 and later all know: what Save writes for the fields a method does not
// set. Fields PEFT added later are left out, as PEFT before 0.14 fails on fields it does not know.
func PEFTDefaults() map[string]any {
	return map[string]any{
		"r": 8, "lora_alpha": 8, "lora_dropout": 0, "target_modules": nil, "use_rslora": false,
		"rank_pattern": map[string]any{}, "alpha_pattern": map[string]any{}, "modules_to_save": nil,
		"init_lora_weights": true, "bias": "none", "fan_in_fan_out": false, "use_dora": false,
		"layers_to_transform": nil, "layers_pattern": nil, "layer_replication": nil,
		"loftq_config": map[string]any{}, "megatron_config": nil, "megatron_core": "megatron.core",
	}
}

// PEFTNumber writes an integral value as a JSON integer (Ollama's converter reads lora_alpha as
// an unsigned integer) and any other as a float.
func PEFTNumber(x float64) any {
	if x == math.Trunc(x) && math.Abs(x) < 1<<53 {
		return int64(x)
	}
	return x
}

// ParsePEFTConfig builds the LoRA configuration of a PEFT adapter_config.json (peft_type LORA):
// what is missing takes PEFT's defaults (target_modules null means q_proj and v_proj, PEFT's
// choice for Llama-family models); use_dora makes it DoRA. Fields that change what the adapter
// computes and that we do not implement are errors naming the field: fan_in_fan_out, bias other
// than "none",
// lora_bias, layers_to_transform, layers_pattern, exclude_modules, trainable_token_indices,
// layer_replication, use_qalora, target_parameters, alora_invocation_tokens and the other
// variants' configurations, and init_lora_weights values that rewrite the base weights (PiSSA,
// OLoRA, LoftQ, EVA, CorDA …). Training-time and initialization options are read or ignored.
func ParsePEFTConfig(fields *peft.PEFTFields) (Config, error) {
	c := DefaultConfig()
	var init any
	for _, get := range []struct {
		key string
		dst any
	}{
		{"r", &c.Rank}, {"lora_alpha", &c.Alpha}, {"lora_dropout", &c.Dropout}, {"use_rslora", &c.UseRSLoRA},
		{"modules_to_save", &c.ModulesToSave}, {"rank_pattern", &c.RankPattern},
		{"alpha_pattern", &c.AlphaPattern}, {"target_modules", &c.TargetModules}, {"init_lora_weights", &init},
		{"use_dora", &c.UseDoRA},
	} {
		if err := fields.Get(get.key, get.dst); err != nil {
			return Config{}, err
		}
	}
	switch init {
	case "gaussian":
		c.InitA = InitGaussian
	case nil, true, false, "eva", "orthogonal":
		// Initializations of A and B alone: a trained adapter is plain LoRA.
		c.InitA = InitKaiming
	default:
		// pissa…, olora, loftq, corda, lora_ga subtract the initial update from the base weights,
		// so the adapter needs that changed base; anything else is unknown.
		return Config{}, fmt.Errorf("lora: %s: field \"init_lora_weights\" = %v is not supported: it rewrites the base weights (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA) or is unknown; convert the adapter to plain LoRA in PEFT first",
			fields.Source(), init)
	}
	if err := refuseVariants(fields, "use_dora"); err != nil {
		return Config{}, err
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", fields.Source(), err)
	}
	return c, nil
}

// RefusePEFTVariants refuses the fields of PEFT's LoraConfig (which AdaLoraConfig extends) that
// change what an adapter computes and that methods other than LoRA itself do not implement
// (use_dora among them), naming the first one set, and marks the training-time ones as read.
func RefusePEFTVariants(fields *peft.PEFTFields) error { return refuseVariants(fields) }

// refuseVariants is RefusePEFTVariants without the fields in implemented.
func refuseVariants(fields *peft.PEFTFields, implemented ...string) error {
	refused := []struct {
		key     string
		allowed []string
	}{
		{"use_dora", []string{"false"}}, {"fan_in_fan_out", []string{"false"}}, {"bias", []string{`"none"`}},
		{"lora_bias", []string{"false"}}, {"layers_to_transform", nil}, {"layers_pattern", nil},
		{"exclude_modules", nil}, {"trainable_token_indices", nil}, {"layer_replication", nil},
		{"use_qalora", []string{"false"}}, {"target_parameters", nil}, {"alora_invocation_tokens", nil},
		{"velora_config", nil}, {"use_bdlora", nil}, {"arrow_config", nil}, {"kasa_config", nil},
		{"monteclora_config", nil},
	}
	for _, r := range refused {
		if slices.Contains(implemented, r.key) {
			continue
		}
		if err := fields.Refuse(r.key, r.allowed...); err != nil {
			return fmt.Errorf("lora: %w", err)
		}
	}
	fields.Ignore("megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config",
		"lora_ga_config", "runtime_config", "qalora_group_size", "ensure_weight_tying")
	return nil
}

// CheckPEFTConfig implements peft.PEFTFormat: the file must adapt the same layers with the same
// rank and scale, with DoRA or without as the model's method, and save the same modules (dropout
// and initialization do not change a trained adapter).
func (l *LoRA) CheckPEFTConfig(fields *peft.PEFTFields) error {
	c, err := ParsePEFTConfig(fields)
	if err != nil {
		return err
	}
	if err := peft.SameTargets(l.layout, func(path string) bool { return l.targets[path] != nil }, c.TargetModules, fields.Source()); err != nil {
		return fmt.Errorf("lora: %w", err)
	}
	if err := peft.SameModules(l.layout, l.modules, c.ModulesToSave, fields.Source()); err != nil {
		return fmt.Errorf("lora: %w", err)
	}
	if c.UseDoRA != l.cfg.UseDoRA {
		return fmt.Errorf("lora: %s: use_dora is %v, the model's method has %v", fields.Source(), c.UseDoRA, l.cfg.UseDoRA)
	}
	for _, t := range l.order {
		rank, _, scale := c.Resolve(t.layer.Path)
		if rank != t.rank {
			return fmt.Errorf("lora: %s: rank %d for %s (r, rank_pattern), the model's method has %d", fields.Source(), rank, t.layer.Path, t.rank)
		}
		if math.Abs(scale-t.scale) > 1e-12*math.Abs(t.scale) {
			return fmt.Errorf("lora: %s: scale %g for %s (lora_alpha, alpha_pattern, use_rslora), the model's method has %g", fields.Source(), scale, t.layer.Path, t.scale)
		}
	}
	return nil
}

// PEFTTensors implements peft.PEFTFormat.
func (l *LoRA) PEFTTensors(*context.Context) ([]safetensors.Tensor, error) {
	out := make([]safetensors.Tensor, 0, 3*len(l.order))
	for _, t := range l.order {
		a, b, err := t.factors()
		if err != nil {
			return nil, err
		}
		in, r, o := t.layer.In, t.rank, t.layer.Out
		key := peft.PEFTPrefix + t.layer.Path
		out = append(out,
			safetensors.FromFloat32(key+".lora_A.weight", []int{r, in}, peft.Transpose(a, in, r)),
			safetensors.FromFloat32(key+".lora_B.weight", []int{o, r}, peft.Transpose(b, r, o)))
		if t.magnitude != nil {
			m, err := peft.Float32s(t.magnitude)
			if err != nil {
				return nil, err
			}
			out = append(out, safetensors.FromFloat32(key+".lora_magnitude_vector", []int{o}, m))
		}
	}
	modules, err := peft.HFTensors(peft.PEFTPrefix, l.modules)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}

// PEFTValues implements peft.PEFTFormat.
func (l *LoRA) PEFTValues(_ *context.Context, _ *peft.PEFTFields, file *peft.PEFTTensorFile) ([]*tensors.Tensor, error) {
	out := make([]*tensors.Tensor, 0, 3*len(l.order)+len(l.modules))
	for _, t := range l.order {
		in, r, o := t.layer.In, t.rank, t.layer.Out
		key := peft.PEFTPrefix + t.layer.Path
		a, err := file.Take(key+".lora_A.weight", r, in)
		if err != nil {
			return nil, err
		}
		b, err := file.Take(key+".lora_B.weight", o, r)
		if err != nil {
			return nil, err
		}
		out = append(out,
			tensors.FromFlatDataAndDimensions(peft.Transpose(a, r, in), in, r),
			tensors.FromFlatDataAndDimensions(peft.Transpose(b, o, r), r, o))
		if t.magnitude != nil {
			m, err := file.Take(key+".lora_magnitude_vector", o)
			if err != nil {
				return nil, err
			}
			out = append(out, tensors.FromFlatDataAndDimensions(m, o))
		}
	}
	modules, err := peft.HFValues(peft.PEFTPrefix, l.modules, file)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}
