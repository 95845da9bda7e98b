package qlora

import (
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
	"peft/peft/safetensors"
)

// A QLoRA adapter is saved as the LoRA folder PEFT writes for a 4-bit base (peft_type "LORA",
// the same keys and config fields as package lora): the quantization belongs to the base model's
// folder (SaveQuantized), as in Hugging Face, where it is the base's quantization_config. The
// quantization options are kept in the SDK's record in the safetensors metadata, so
// methods.FromFolder rebuilds QLoRA from a folder QLoRA saved.

// PEFTType implements peft.PEFTFormat.
func (l *QLoRA) PEFTType() string { return l.lora.PEFTType() }

// PEFTConfig implements peft.PEFTFormat: LoRA's.
func (l *QLoRA) PEFTConfig(ctx *context.Context) (map[string]any, error) {
	return l.lora.PEFTConfig(ctx)
}

// CheckPEFTConfig implements peft.PEFTFormat: LoRA's.
func (l *QLoRA) CheckPEFTConfig(fields *peft.PEFTFields) error {
	return l.lora.CheckPEFTConfig(fields)
}

// PEFTTensors implements peft.PEFTFormat: LoRA's.
func (l *QLoRA) PEFTTensors(ctx *context.Context) ([]safetensors.Tensor, error) {
	return l.lora.PEFTTensors(ctx)
}

// PEFTValues implements peft.PEFTFormat: LoRA's.
func (l *QLoRA) PEFTValues(ctx *context.Context, fields *peft.PEFTFields, file *peft.PEFTTensorFile) ([]*tensors.Tensor, error) {
	return l.lora.PEFTValues(ctx, fields, file)
}

// ReplacedBase implements peft.BaseReplacer: the 4-bit weights and their scales, which the base
// fingerprint covers in place of the float weights.
func (l *QLoRA) ReplacedBase() []*context.Variable { return l.QuantizedVariables() }

// BaseParams implements peft.BaseReplacer: the weights held in 4 bits count as the parameters
// they stand for, as Hugging Face's print_trainable_parameters counts them.
func (l *QLoRA) BaseParams() int64 { return l.QuantizedParams() }
