package peft_test

import (
	"io"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft"
)

func numberedBatches(n int) []peft.Batch {
	batches := make([]peft.Batch, n)
	for i := range batches {
		batches[i] = peft.Batch{
			Inputs: []*tensors.Tensor{tensors.FromValue([]int32{int32(i)})},
			Labels: []*tensors.Tensor{tensors.FromValue([]int32{int32(10 + i)})},
		}
	}
	return batches
}

// yieldIDs yields n times and returns the number each batch carries, or -1 for io.EOF.
func yieldIDs(t *testing.T, ds *peft.Dataset, n int) []int {
	t.Helper()
	var ids []int
	for range n {
		spec, inputs, labels, err := ds.Yield()
		require.Nil(t, spec)
		if err == io.EOF {
			require.Nil(t, inputs)
			ids = append(ids, -1)
			continue
		}
		require.NoError(t, err)
		in := inputs[0].Value().([]int32)[0]
		require.Equal(t, in+10, labels[0].Value().([]int32)[0], "inputs and labels of the same batch")
		ids = append(ids, int(in))
	}
	return ids
}

func TestDataset(t *testing.T) {
	for _, tc := range []struct {
		name    string
		batches int
		loop    bool
		want    []int
	}{
		{"one pass then io.EOF", 3, false, []int{0, 1, 2, -1, -1}},
		{"looping cycles forever", 3, true, []int{0, 1, 2, 0, 1, 2, 0}},
		{"empty", 0, false, []int{-1, -1}},
		{"empty looping ends too", 0, true, []int{-1, -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ds := peft.NewDataset("toy", numberedBatches(tc.batches), tc.loop)
			require.Equal(t, "toy", ds.Name())
			require.Equal(t, tc.batches, ds.Len())
			require.False(t, ds.IsOwnershipTransferred(), "the loop must not free reused tensors")
			require.Equal(t, tc.want, yieldIDs(t, ds, len(tc.want)))
		})
	}
	// Reset starts over, mid-pass or after the end.
	ds := peft.NewDataset("toy", numberedBatches(3), false)
	require.Equal(t, []int{0, 1}, yieldIDs(t, ds, 2))
	ds.Reset()
	require.Equal(t, []int{0, 1, 2, -1}, yieldIDs(t, ds, 4))
	ds.Reset()
	require.Equal(t, []int{0}, yieldIDs(t, ds, 1))
	looping := peft.NewDataset("toy", numberedBatches(3), true)
	require.Equal(t, []int{0, 1}, yieldIDs(t, looping, 2))
	looping.Reset()
	require.Equal(t, []int{0, 1, 2, 0}, yieldIDs(t, looping, 4))
}
