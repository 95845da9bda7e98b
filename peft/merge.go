package peft

import (
	"errors"
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
)

// WeightMerge is the mechanics every mergeable method shares for peft.Merger: it changes the
// base weights (and biases, where the method needs it) and keeps the originals aside, so that
// Unmerge restores them bit for bit (undoing the change in floating point would not). A method
// embeds one and supplies the update of each layer.
type WeightMerge struct {
	vars      []*context.Variable // what was changed: weights and biases
	originals []*tensors.Tensor
}

// Merge sets W ← W + delta(i) for each layers[i] (delta is [In, Out], row-major). Every merged
// weight is computed before any changes, so an error leaves the model unmerged.
func (w *WeightMerge) Merge(ctx *context.Context, layers []*LinearLayer, delta func(i int) ([]float32, error)) error {
	return w.Replace(ctx, layers, func(i int, weights, _ []float32) ([]float32, []float32, error) {
		d, err := delta(i)
		if err != nil {
			return nil, nil, err
		}
		if len(d) != len(weights) {
			return nil, nil, fmt.Errorf("layer %s: update has %d values, the weights %d", layers[i].Path, len(d), len(weights))
		}
		for k := range weights {
			weights[k] += d[k]
		}
		return weights, nil, nil
	})
}

// Replace sets each layers[i]'s weights and biases to what merged(i, W, b) returns: it gets the
// current weights W ([In, Out], row-major) and biases b ([Out]; nil when the layer has none), each
// its own copy to change, and returns the new weights and the new biases (nil: biases unchanged).
// For updates that are not additive: DoRA's rescaling, (IA)³'s scaling of weights and biases.
// Every new value is computed before any changes, so an error leaves the model unmerged; only
// what changes is kept aside.
func (w *WeightMerge) Replace(ctx *context.Context, layers []*LinearLayer, merged func(i int, weights, biases []float32) ([]float32, []float32, error)) error {
	if w.Merged() {
		return errors.New("already merged")
	}
	vars := make([]*context.Variable, 0, len(layers))
	values := make([][]float32, 0, len(layers))
	originals := make([]*tensors.Tensor, 0, len(layers))
	keep := func(v *context.Variable, current, value []float32, what string, layer *LinearLayer) error {
		if len(value) != len(current) {
			return fmt.Errorf("layer %s: merged %s have %d values, the layer %d", layer.Path, what, len(value), len(current))
		}
		original, err := v.Value()
		if err != nil {
			return err
		}
		clone, err := original.Clone()
		if err != nil {
			return err
		}
		vars, values, originals = append(vars, v), append(values, value), append(originals, clone)
		return nil
	}
	for i, layer := range layers {
		weights := layer.Weights(ctx)
		if weights == nil {
			return fmt.Errorf("layer %s has no float weights to merge into", layer.Path)
		}
		current, err := Float32s(weights)
		if err != nil {
			return err
		}
		var currentBiases []float32
		biases := layer.Biases(ctx)
		if biases != nil {
			if currentBiases, err = Float32s(biases); err != nil {
				return err
			}
		}
		newWeights, newBiases, err := merged(i, current, currentBiases)
		if err != nil {
			return err
		}
		if err := keep(weights, current, newWeights, "weights", layer); err != nil {
			return err
		}
		if newBiases != nil {
			if biases == nil {
				return fmt.Errorf("layer %s: merged biases for a layer without a bias", layer.Path)
			}
			if err := keep(biases, currentBiases, newBiases, "biases", layer); err != nil {
				return err
			}
		}
	}
	for i, v := range vars {
		if err := SetFloat32s(v, values[i]); err != nil {
			for k := range i { // put back what was already changed
				_ = vars[k].SetValue(originals[k])
			}
			return err
		}
	}
	w.vars, w.originals = vars, originals
	return nil
}

// Unmerge restores the weights and biases Merge changed, exactly.
func (w *WeightMerge) Unmerge(*context.Context) error {
	if !w.Merged() {
		return errors.New("not merged")
	}
	for i, v := range w.vars {
		if err := v.SetValue(w.originals[i]); err != nil {
			return err
		}
	}
	w.vars, w.originals = nil, nil
	return nil
}

// Merged reports whether Merge's update is in the weights.
func (w *WeightMerge) Merged() bool { return w.originals != nil }

// LowRankProduct returns scale·A·diag(d)·B as an [in, out] row-major matrix, for A [in, r] and
// B [r, out] row-major (d nil means the identity). It accumulates in float64 and rounds once, so
// a merged weight differs from the unmerged computation by float32 rounding only.
func LowRankProduct(a []float32, in, r int, d []float32, b []float32, out int, scale float64) []float32 {
	product := make([]float32, in*out)
	row := make([]float64, out)
	for i := range in {
		clear(row)
		for k := range r {
			aik := float64(a[i*r+k])
			if d != nil {
				aik *= float64(d[k])
			}
			if aik == 0 {
				continue
			}
			for j, bkj := range b[k*out : (k+1)*out] {
				row[j] += aik * float64(bkj)
			}
		}
		for j := range out {
			product[i*out+j] = float32(scale * row[j])
		}
	}
	return product
}
