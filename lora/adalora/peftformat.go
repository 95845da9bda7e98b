package adalora

import (
	"fmt"
	"slices"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/lora"
	"peft/peft"
	"peft/peft/safetensors"
)

// Hugging Face PEFT's layout of an AdaLoRA adapter (peft.PEFTFormat):
//
//	adapter_config.json: peft_type "ADALORA", init_r, target_r, tinit, tfinal, deltaT, beta1,
//	  beta2, orth_reg_weight, total_step, lora_alpha, lora_dropout, target_modules,
//	  modules_to_save, rank_pattern {"<path>.lora_E": [init_r booleans]} from the masks, and
//	  LoraConfig's defaults for the rest (r 8, which AdaLoRA ignores).
//	adapter_model.safetensors, per adapted layer, cut to the kept singular values as PEFT's
//	  resize_state_dict_by_rank_pattern does: base_model.model.<path>.lora_A [kept, in] (Q, our
//	  Aᵀ), .lora_E [kept, 1] (Λ), .lora_B [out, kept] (P, our Bᵀ); no .weight suffix, no ranknum
//	  (PEFT recomputes it as init_r). Modules to save as in LoRA.
//
// Loading puts the kept rows back at the positions the rank pattern marks and zeroes the others,
// with the masks set from the pattern: the forward x·Aᵀ∘E·Bᵀ·α/(init_r + 1e-5) is PEFT's.

// PEFTType implements peft.PEFTFormat.
func (a *AdaLoRA) PEFTType() string { return "ADALORA" }

// PEFTConfig implements peft.PEFTFormat.
func (a *AdaLoRA) PEFTConfig(*context.Context) (map[string]any, error) {
	c := a.cfg
	masks, err := a.readMasks()
	if err != nil {
		return nil, err
	}
	pattern := make(peft.Patterns[[]bool], 0, len(a.order))
	for _, t := range a.order {
		kept := make([]bool, c.InitRank)
		for i, m := range masks[t.offset : t.offset+c.InitRank] {
			kept[i] = m != 0
		}
		pattern = append(pattern, peft.Pattern[[]bool]{Key: t.layer.Path + ".lora_E", Value: kept})
	}
	fields := lora.PEFTDefaults()
	for key, value := range map[string]any{
		"init_r": c.InitRank, "target_r": c.TargetRank, "tinit": c.TInit, "tfinal": c.TFinal,
		"deltaT": c.DeltaT, "beta1": c.Beta1, "beta2": c.Beta2, "orth_reg_weight": c.OrthRegWeight,
		"total_step": c.TotalSteps, "lora_alpha": lora.PEFTNumber(c.Alpha), "lora_dropout": c.Dropout,
		"target_modules": c.TargetModules, "modules_to_save": peft.ListOrNull(c.ModulesToSave),
		"rank_pattern": pattern,
	} {
		fields[key] = value
	}
	return fields, nil
}

// ParsePEFTConfig builds the AdaLoRA configuration of a PEFT adapter_config.json (peft_type
// ADALORA), with PEFT's defaults for what is missing. As PEFT, it requires total_step > 0 and a
// budgeting phase (tinit < total_step − tfinal). The rank pattern is not part of the
// configuration: it is read with the tensors. Fields that change what the adapter computes and
// that AdaLoRA here does not implement are refused as in lora.ParsePEFTConfig.
func ParsePEFTConfig(fields *peft.PEFTFields) (Config, error) {
	c := DefaultConfig()
	for _, get := range []struct {
		key string
		dst any
	}{
		{"init_r", &c.InitRank}, {"target_r", &c.TargetRank}, {"tinit", &c.TInit}, {"tfinal", &c.TFinal},
		{"deltaT", &c.DeltaT}, {"beta1", &c.Beta1}, {"beta2", &c.Beta2}, {"orth_reg_weight", &c.OrthRegWeight},
		{"total_step", &c.TotalSteps}, {"lora_alpha", &c.Alpha}, {"lora_dropout", &c.Dropout},
		{"target_modules", &c.TargetModules}, {"modules_to_save", &c.ModulesToSave},
	} {
		if err := fields.Get(get.key, get.dst); err != nil {
			return Config{}, err
		}
	}
	if err := lora.RefusePEFTVariants(fields); err != nil {
		return Config{}, err
	}
	// AdaLoRA ignores r, use_rslora and alpha_pattern; the rank pattern is read with the tensors.
	fields.Ignore("r", "use_rslora", "alpha_pattern", "init_lora_weights", "rank_pattern")
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", fields.Source(), err)
	}
	return c, nil
}

// CheckPEFTConfig implements peft.PEFTFormat: the file must adapt the same layers with the same
// initial rank and alpha, and save the same modules (the budget schedule and regularization only
// shape training).
func (a *AdaLoRA) CheckPEFTConfig(fields *peft.PEFTFields) error {
	c, err := ParsePEFTConfig(fields)
	if err != nil {
		return err
	}
	switch {
	case c.InitRank != a.cfg.InitRank:
		return fmt.Errorf("adalora: %s: init_r %d, the model's method has %d", fields.Source(), c.InitRank, a.cfg.InitRank)
	case c.Alpha != a.cfg.Alpha:
		return fmt.Errorf("adalora: %s: lora_alpha %g, the model's method has %g", fields.Source(), c.Alpha, a.cfg.Alpha)
	}
	if err := peft.SameTargets(a.layout, func(path string) bool { return a.targets[path] != nil }, c.TargetModules, fields.Source()); err != nil {
		return fmt.Errorf("adalora: %w", err)
	}
	if err := peft.SameModules(a.layout, a.modules, c.ModulesToSave, fields.Source()); err != nil {
		return fmt.Errorf("adalora: %w", err)
	}
	return nil
}

// PEFTTensors implements peft.PEFTFormat.
func (a *AdaLoRA) PEFTTensors(*context.Context) ([]safetensors.Tensor, error) {
	r := a.cfg.InitRank
	var out []safetensors.Tensor
	for _, t := range a.order {
		av, err := peft.Float32s(t.a) // [in, r]
		if err != nil {
			return nil, err
		}
		ev, err := peft.Float32s(t.e)
		if err != nil {
			return nil, err
		}
		bv, err := peft.Float32s(t.b) // [r, out]
		if err != nil {
			return nil, err
		}
		mask, err := peft.Float32s(t.mask)
		if err != nil {
			return nil, err
		}
		in, o := t.layer.In, t.layer.Out
		qt, pt := peft.Transpose(av, in, r), bv // Q [r, in] and Pᵀ [r, out], one row per singular value
		var q, e, p []float32
		for i := range r {
			if mask[i] != 0 {
				q = append(q, qt[i*in:(i+1)*in]...)
				e = append(e, ev[i])
				p = append(p, pt[i*o:(i+1)*o]...)
			}
		}
		kept := len(e)
		key := peft.PEFTPrefix + t.layer.Path
		out = append(out,
			safetensors.FromFloat32(key+".lora_A", []int{kept, in}, q),
			safetensors.FromFloat32(key+".lora_E", []int{kept, 1}, e),
			safetensors.FromFloat32(key+".lora_B", []int{o, kept}, peft.Transpose(p, kept, o)))
	}
	modules, err := peft.HFTensors(peft.PEFTPrefix, a.modules)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}

// PEFTValues implements peft.PEFTFormat: A, E, B and the mask of every target (from the file's
// rank_pattern; all kept where it has no entry), then the modules to save.
func (a *AdaLoRA) PEFTValues(_ *context.Context, fields *peft.PEFTFields, file *peft.PEFTTensorFile) ([]*tensors.Tensor, error) {
	var pattern peft.Patterns[[]bool]
	if err := fields.Get("rank_pattern", &pattern); err != nil {
		return nil, err
	}
	r := a.cfg.InitRank
	kept := map[string][]bool{}
	for _, p := range pattern {
		// PEFT names the entry <module path>.lora_E, with the adapter name after it while training.
		path, _, found := strings.Cut(p.Key, ".lora_E")
		if !found || a.targets[path] == nil {
			return nil, fmt.Errorf("adalora: %s: rank_pattern key %q names no adapted layer's lora_E (adapted: %v)", fields.Source(), p.Key, a.Targets())
		}
		if len(p.Value) != r {
			return nil, fmt.Errorf("adalora: %s: rank_pattern %q has %d entries, init_r is %d", fields.Source(), p.Key, len(p.Value), r)
		}
		kept[path] = p.Value
	}
	var out []*tensors.Tensor
	for _, t := range a.order {
		mask := kept[t.layer.Path]
		if mask == nil {
			mask = slices.Repeat([]bool{true}, r)
		}
		n := 0
		for _, k := range mask {
			if k {
				n++
			}
		}
		in, o := t.layer.In, t.layer.Out
		key := peft.PEFTPrefix + t.layer.Path
		q, err := file.Take(key+".lora_A", n, in)
		if err != nil {
			return nil, err
		}
		e, err := file.Take(key+".lora_E", n, 1)
		if err != nil {
			return nil, err
		}
		p, err := file.Take(key+".lora_B", o, n)
		if err != nil {
			return nil, err
		}
		pt := peft.Transpose(p, o, n) // [n, out]
		qt := make([]float32, r*in)   // Q [r, in], masked rows zero
		ev := make([]float32, r)
		bv := make([]float32, r*o) // Pᵀ [r, out]
		mv := make([]float32, r)
		j := 0
		for i, k := range mask {
			if !k {
				continue
			}
			copy(qt[i*in:(i+1)*in], q[j*in:(j+1)*in])
			ev[i] = e[j]
			copy(bv[i*o:(i+1)*o], pt[j*o:(j+1)*o])
			mv[i] = 1
			j++
		}
		out = append(out,
			tensors.FromFlatDataAndDimensions(peft.Transpose(qt, r, in), in, r),
			tensors.FromFlatDataAndDimensions(ev, r),
			tensors.FromFlatDataAndDimensions(bv, r, o),
			tensors.FromFlatDataAndDimensions(mv, r))
	}
	modules, err := peft.HFValues(peft.PEFTPrefix, a.modules, file)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}
