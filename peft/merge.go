package peft

import (
	"errors"
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
)

// WeightMerge is the mechanics every low-rank method shares for peft.Merger: it adds a per-layer
// update to the base weights and keeps the originals aside, so that Unmerge restores them bit for
// bit (subtracting again would not, in floating point). A method embeds one and supplies the
// update of each layer.
type WeightMerge struct {
	layers    []*LinearLayer
	originals []*tensors.Tensor
}

// Merge sets W ← W + delta(i) for each layers[i] (delta is [In, Out], row-major). Every merged
// weight is computed before any changes, so an error leaves the model unmerged.
func (w *WeightMerge) Merge(ctx *context.Context, layers []*LinearLayer, delta func(i int) ([]float32, error)) error {
	return w.Replace(ctx, layers, func(i int, weights []float32) ([]float32, error) {
		d, err := delta(i)
		if err != nil {
			return nil, err
		}
		if len(d) != len(weights) {
			return nil, fmt.Errorf("layer %s: update has %d values, the weights %d", layers[i].Path, len(d), len(weights))
		}
		for k := range weights {
			weights[k] += d[k]
		}
		return weights, nil
	})
}

// Replace sets each layers[i]'s weights to merged(i, W), which gets the current weights W ([In,
// Out], row-major, its own copy to change) and returns the new ones: for updates that are not
// additive, such as DoRA's rescaling. Every new weight is computed before any changes, so an
// error leaves the model unmerged.
func (w *WeightMerge) Replace(ctx *context.Context, layers []*LinearLayer, merged func(i int, weights []float32) ([]float32, error)) error {
	if w.Merged() {
		return errors.New("already merged")
	}
	values := make([][]float32, len(layers))
	originals := make([]*tensors.Tensor, len(layers))
	for i, layer := range layers {
		weights := layer.Weights(ctx)
		if weights == nil {
			return fmt.Errorf("layer %s has no float weights to merge into", layer.Path)
		}
		value, err := weights.Value()
		if err != nil {
			return err
		}
		if originals[i], err = value.Clone(); err != nil {
			return err
		}
		current, err := Float32s(weights)
		if err != nil {
			return err
		}
		if values[i], err = merged(i, current); err != nil {
			return err
		}
		if len(values[i]) != len(current) {
			return fmt.Errorf("layer %s: merged weights have %d values, the layer %d", layer.Path, len(values[i]), len(current))
		}
	}
	for i, layer := range layers {
		if err := SetFloat32s(layer.Weights(ctx), values[i]); err != nil {
			for k := range i { // put back what was already changed
				_ = layers[k].Weights(ctx).SetValue(originals[k])
			}
			return err
		}
	}
	w.layers, w.originals = layers, originals
	return nil
}

// Unmerge restores the weights Merge changed, exactly.
func (w *WeightMerge) Unmerge(ctx *context.Context) error {
	if !w.Merged() {
		return errors.New("not merged")
	}
	for i, layer := range w.layers {
		if err := layer.Weights(ctx).SetValue(w.originals[i]); err != nil {
			return err
		}
	}
	w.layers, w.originals = nil, nil
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
