package peft_test

import (
	"sync"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/pefttest"
)

// Bad inputs and labels are errors at the API edge that name the input, the index and the
// value: out-of-range token ids in Call and in training, a mask of another shape, a third input,
// a class label beyond the classifier's classes.
func TestInputsAreChecked(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t)) // the tiny classifier: vocabulary 64, 2 classes
	ids := func(v ...int32) *tensors.Tensor { return tensors.FromFlatDataAndDimensions(v, 1, len(v)) }
	for _, tc := range []struct {
		name   string
		inputs []*tensors.Tensor
		want   string
	}{
		{"id beyond the vocabulary", []*tensors.Tensor{ids(1, 2, 64)}, "inputs[0] (token ids outside the vocabulary): value 64 at index [0 2] is not in [0, 64)"},
		{"negative id", []*tensors.Tensor{ids(-1, 2)}, "value -1 at index [0 0]"},
		{"float ids", []*tensors.Tensor{tensors.FromFlatDataAndDimensions([]float32{1, 2}, 1, 2)}, "must be int32 or int64, got Float32"},
		{"mask of another shape", []*tensors.Tensor{ids(1, 2, 3), ids(1, 1)}, "inputs[1] (a mask) is shaped [1 2], the token ids [1 3]"},
		{"a third input", []*tensors.Tensor{ids(1, 2), ids(1, 1), ids(1, 1)}, "the model takes token ids and a mask, got 3 inputs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.Call(tc.inputs...)
			require.ErrorContains(t, err, tc.want)
		})
	}
	_, err := m.Call(ids(1, 2, 63), ids(1, 1, 1))
	require.NoError(t, err)

	_, err = m.Call(tensors.FromFlatDataAndDimensions([]int32{}, 1, 0))
	require.ErrorContains(t, err, "inputs[0] (token ids) is shaped [1 0]: no tokens")

	trainer := newTrainer(t, m, 3)
	one := pefttest.ToyBatches(1, 3)
	one[0].Labels = []*tensors.Tensor{tensors.FromFlatDataAndDimensions([]int32{1}, 1, 1)}
	_, err = trainer.Train(peft.NewDataset("train", one, true))
	require.ErrorContains(t, err, "labels[0] (classes) is (Int32)[1 1], a classifier wants one integer class per example: [16] or [16 1]")
	batches := pefttest.ToyBatches(2, 3)
	batches[1].Labels = []*tensors.Tensor{tensors.FromFlatDataAndDimensions(make([]int32, pefttest.Batch), pefttest.Batch, 1)}
	tensors.MutableFlatData(batches[1].Labels[0], func(flat []int32) { flat[3] = 7 })
	_, err = trainer.Train(peft.NewDataset("train", batches, true))
	require.ErrorContains(t, err, "batch 2 of train: labels[0] (classes outside the 2 of the output): value 7 at index [3 0] is not in [0, 2)")
}

// Save, Load, Merge and training wait for running calls, and calls for them: run together they
// give what they give alone (go test -race finds no race).
func TestSaveAndCallTogether(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t))
	pefttest.SetRandomB(t, m, 1, 0.3)
	in := pefttest.ToyBatches(1, 5)[0].Inputs
	want, err := m.Call(in...)
	require.NoError(t, err)
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 4 {
		wg.Go(func() {
			for range 5 {
				got, err := m.Call(in...)
				if err != nil {
					errs <- err
					return
				}
				if !equalTensors(want[0], got[0]) {
					errs <- errWrongOutput
				}
			}
		})
	}
	wg.Go(func() { // one writer: saves, merges and unmerges while the calls run
		for range 4 {
			if err := m.Save(dir); err != nil {
				errs <- err
			}
			if err := m.Merge(); err != nil {
				errs <- err
			}
			if err := m.Unmerge(); err != nil {
				errs <- err
			}
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
}

var errWrongOutput = errorString("a call saw another output")

type errorString string

func (e errorString) Error() string { return string(e) }

func equalTensors(a, b *tensors.Tensor) bool {
	x, y := tensors.MustCopyFlatData[float32](a), tensors.MustCopyFlatData[float32](b)
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		if d := x[i] - y[i]; d > 1e-4 || d < -1e-4 {
			return false
		}
	}
	return true
}
