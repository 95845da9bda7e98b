package peft

import (
	"fmt"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"
)

// CheckInputs checks a model's inputs as Call and the trainer receive them. A model that embeds
// tokens takes token ids (inputs[0]: integers within the vocabulary) and optionally a mask shaped
// as the ids; a third input is refused. The error names the input, and for a bad id its first
// index and value.
func (m *Model) CheckInputs(inputs []*tensors.Tensor) error {
	if len(inputs) == 0 || len(m.layout.Embeddings) == 0 {
		return nil
	}
	if n := max(m.layout.NumInputs, 2); len(inputs) > n {
		return fmt.Errorf("the model takes token ids and a mask, got %d inputs", len(inputs))
	}
	if inputs[0].Shape().Size() == 0 {
		return fmt.Errorf("inputs[0] (token ids) is shaped %v: no tokens", inputs[0].Shape().Dimensions)
	}
	if err := checkIDs("inputs[0] (token ids outside the vocabulary)", inputs[0], m.layout.Embeddings[0].Vocab); err != nil {
		return err
	}
	for i, in := range inputs[1:] {
		if !slices.Equal(in.Shape().Dimensions, inputs[0].Shape().Dimensions) {
			return fmt.Errorf("inputs[%d] (a mask) is shaped %v, the token ids %v", i+1, in.Shape().Dimensions, inputs[0].Shape().Dimensions)
		}
	}
	return nil
}

// CheckLabels checks a batch's integer labels against its inputs and the model's first output:
// for a classifier ([batch, classes]) labels[0] holds one class per example, in [0, classes);
// for a language model ([batch, seq, vocab]) labels[0] is token ids shaped as inputs[0], in the
// vocabulary. Float labels (a regression, a distillation target) are the loss's to check.
func (m *Model) CheckLabels(inputs, labels []*tensors.Tensor) error {
	if len(labels) == 0 || len(inputs) == 0 || len(m.layout.Outputs) == 0 || !labels[0].DType().IsInt() {
		return nil
	}
	out, l, ids := m.layout.Outputs[0], labels[0], inputs[0]
	batch := ids.Shape().Dim(0)
	switch out.Rank() {
	case 2:
		if l.Rank() == 0 || l.Shape().Size() != batch || l.Shape().Dim(0) != batch {
			return fmt.Errorf("labels[0] (classes) is %s, a classifier wants one integer class per example: [%d] or [%d 1]", l.Shape(), batch, batch)
		}
		return checkIDs(fmt.Sprintf("labels[0] (classes outside the %d of the output)", out.Dim(1)), l, out.Dim(1))
	case 3:
		if !slices.Equal(l.Shape().Dimensions, ids.Shape().Dimensions) {
			return fmt.Errorf("labels[0] (token ids) is %s, a language model wants integer ids shaped as inputs[0] %v", l.Shape(), ids.Shape().Dimensions)
		}
		return checkIDs("labels[0] (token ids outside the vocabulary)", l, out.Dim(2))
	}
	return nil
}

// checkIDs requires integer values in [0, limit).
func checkIDs(what string, t *tensors.Tensor, limit int) error {
	var bad func() (int, int64, bool)
	switch t.DType() {
	case dtypes.Int32:
		v := tensors.MustCopyFlatData[int32](t)
		bad = func() (int, int64, bool) {
			for i, x := range v {
				if x < 0 || int(x) >= limit {
					return i, int64(x), true
				}
			}
			return 0, 0, false
		}
	case dtypes.Int64:
		v := tensors.MustCopyFlatData[int64](t)
		bad = func() (int, int64, bool) {
			for i, x := range v {
				if x < 0 || x >= int64(limit) {
					return i, x, true
				}
			}
			return 0, 0, false
		}
	default:
		return fmt.Errorf("%s must be int32 or int64, got %s", what, t.DType())
	}
	if i, x, found := bad(); found {
		dims := t.Shape().Dimensions
		return fmt.Errorf("%s: value %d at index %v is not in [0, %d)", what, x, unflatten(i, dims), limit)
	}
	return nil
}

// unflatten turns a row-major flat index into one index per axis.
func unflatten(i int, dims []int) []int {
	idx := make([]int, len(dims))
	for k := len(dims) - 1; k >= 0; k-- {
		if dims[k] > 0 {
			idx[k] = i % dims[k]
			i /= dims[k]
		}
	}
	return idx
}
