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

// CheckLabels checks a batch's labels against the model's first output: class labels (labels[0]
// of a model whose output is [batch, classes]) in [0, classes), token ids (labels[0] of a
// language model, [batch, seq, vocab]) in the vocabulary.
func (m *Model) CheckLabels(labels []*tensors.Tensor) error {
	if len(labels) == 0 || len(m.layout.Outputs) == 0 {
		return nil
	}
	out := m.layout.Outputs[0]
	switch {
	case out.Rank() == 2 && labels[0].DType().IsInt():
		return checkIDs(fmt.Sprintf("labels[0] (classes outside the %d of the output)", out.Dim(1)), labels[0], out.Dim(1))
	case out.Rank() == 3 && labels[0].DType().IsInt():
		return checkIDs("labels[0] (token ids outside the vocabulary)", labels[0], out.Dim(2))
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
