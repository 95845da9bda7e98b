package ia3

import (
	"fmt"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/safetensors"
)

// Hugging Face PEFT's layout of an (IA)³ adapter (peft.PEFTFormat):
//
//	adapter_config.json: peft_type "IA3", target_modules, feedforward_modules (a list, [] for
//	  none: null would mean PEFT's per-architecture default), modules_to_save, and PEFT's values
//	  for the fields we do not use: fan_in_fan_out false, init_ia3_weights true. exclude_modules
//	  (PEFT 0.14) is left out, so the file loads in every PEFT from 0.10 on (before 0.14 an
//	  unknown field is an error there).
//	adapter_model.safetensors: base_model.model.<path>.ia3_l per adapted layer, [out, 1], or
//	  [1, in] for feedforward modules; base_model.model.<module>.weight (and .bias) for
//	  modules_to_save, in PyTorch's layout.

// PEFTType implements peft.PEFTFormat.
func (m *IA3) PEFTType() string { return "IA3" }

// PEFTConfig implements peft.PEFTFormat.
func (m *IA3) PEFTConfig(*context.Context) (map[string]any, error) {
	var ff any = m.cfg.FeedforwardModules
	if m.cfg.FeedforwardModules.IsZero() {
		ff = []string{}
	}
	return map[string]any{
		"target_modules": m.cfg.TargetModules, "feedforward_modules": ff,
		"modules_to_save": peft.ListOrNull(m.cfg.ModulesToSave), "fan_in_fan_out": false, "init_ia3_weights": true,
	}, nil
}

// defaultFeedforward is PEFT's feedforward module for Llama-family models, which PEFT takes when
// feedforward_modules is null.
const defaultFeedforward = "down_proj"

// ParsePEFTConfig builds the (IA)³ configuration of a PEFT adapter_config.json (peft_type IA3):
// what is missing takes PEFT's defaults for Llama models. target_modules null means k_proj,
// v_proj and down_proj; feedforward_modules null means down_proj, taken as PEFT takes it (after
// its check that feedforward modules are targets): with a target list, the targets whose name
// ends with "down_proj", which are the targeted layers PEFT's suffix rule finds. PEFT itself
// always writes both fields resolved.
//
// exclude_modules (other than null or []) is an error naming the field: it changes which layers
// are adapted and is not implemented. fan_in_fan_out is read and ignored: PEFT resets it to false
// on torch.nn.Linear layers, which every model of this SDK has, and the vectors are the same
// either way. init_ia3_weights only says how the vectors started.
func ParsePEFTConfig(fields *peft.PEFTFields) (Config, error) {
	c := DefaultConfig()
	if err := fields.Get("target_modules", &c.TargetModules); err != nil {
		return Config{}, err
	}
	if fields.Has("feedforward_modules") {
		c.FeedforwardModules = peft.Targets{}
		if err := fields.Get("feedforward_modules", &c.FeedforwardModules); err != nil {
			return Config{}, err
		}
		if c.FeedforwardModules.IsZero() {
			c.FeedforwardModules = peft.Targets{} // [] as the zero value
		}
	} else {
		fields.Ignore("feedforward_modules")
		c.FeedforwardModules = peft.TargetNames(defaultFeedforward)
		if names := c.TargetModules.Names; len(names) > 0 {
			c.FeedforwardModules = peft.Targets{}
			for _, name := range names {
				if strings.HasSuffix(name, defaultFeedforward) {
					c.FeedforwardModules.Names = append(c.FeedforwardModules.Names, name)
				}
			}
		}
	}
	if err := fields.Get("modules_to_save", &c.ModulesToSave); err != nil {
		return Config{}, err
	}
	if err := fields.Refuse("exclude_modules", "[]"); err != nil {
		return Config{}, fmt.Errorf("ia3: %w", err)
	}
	fields.Ignore("fan_in_fan_out", "init_ia3_weights")
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", fields.Source(), err)
	}
	return c, nil
}

// CheckPEFTConfig implements peft.PEFTFormat: the file must adapt the same layers, with the same
// ones treated as feedforward modules, and save the same modules.
func (m *IA3) CheckPEFTConfig(fields *peft.PEFTFields) error {
	c, err := ParsePEFTConfig(fields)
	if err != nil {
		return err
	}
	if err := peft.SameTargets(m.layout, func(path string) bool { return m.targets[path] != nil }, c.TargetModules, fields.Source()); err != nil {
		return fmt.Errorf("ia3: %w", err)
	}
	if err := peft.SameModules(m.layout, m.modules, c.ModulesToSave, fields.Source()); err != nil {
		return fmt.Errorf("ia3: %w", err)
	}
	isFeedforward := c.feedforward()
	for _, t := range m.order {
		switch theirs := isFeedforward(t.layer.Path); {
		case theirs && !t.feedforward:
			return fmt.Errorf("ia3: %s: feedforward_modules %s make %s a feedforward module (its vector scales the input), the model's method scales its output",
				fields.Source(), c.FeedforwardModules, t.layer.Path)
		case !theirs && t.feedforward:
			return fmt.Errorf("ia3: %s: feedforward_modules %s leave out %s (its vector scales the output), the model's method scales its input",
				fields.Source(), c.FeedforwardModules, t.layer.Path)
		}
	}
	return nil
}

// peftKey and peftDims are the tensor name and PEFT's shape of t's vector.
func (t *target) peftKey() string { return peft.PEFTPrefix + t.layer.Path + ".ia3_l" }

func (t *target) peftDims() []int {
	if t.feedforward {
		return []int{1, t.layer.In}
	}
	return []int{t.layer.Out, 1}
}

// PEFTTensors implements peft.PEFTFormat.
func (m *IA3) PEFTTensors(*context.Context) ([]safetensors.Tensor, error) {
	out := make([]safetensors.Tensor, 0, len(m.order)+len(m.modules))
	for _, t := range m.order {
		l, err := peft.Float32s(t.l)
		if err != nil {
			return nil, err
		}
		out = append(out, safetensors.FromFloat32(t.peftKey(), t.peftDims(), l))
	}
	modules, err := peft.HFTensors(peft.PEFTPrefix, m.modules)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}

// PEFTValues implements peft.PEFTFormat.
func (m *IA3) PEFTValues(_ *context.Context, _ *peft.PEFTFields, file *peft.PEFTTensorFile) ([]*tensors.Tensor, error) {
	out := make([]*tensors.Tensor, 0, len(m.order)+len(m.modules))
	for _, t := range m.order {
		l, err := file.Take(t.peftKey(), t.peftDims()...)
		if err != nil {
			return nil, err
		}
		out = append(out, tensors.FromFlatDataAndDimensions(l, t.size()))
	}
	modules, err := peft.HFValues(peft.PEFTPrefix, m.modules, file)
	if err != nil {
		return nil, err
	}
	return append(out, modules...), nil
}
