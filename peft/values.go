package peft

import (
	"fmt"
	"math/rand/v2"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
)

// Float32s copies a float32 variable's value to the host. Methods use it for host-side work
// (merging, quantizing, initializing from the base weights).
func Float32s(v *context.Variable) ([]float32, error) {
	if v.DType() != dtypes.Float32 {
		return nil, fmt.Errorf("variable %s is %s, not float32", v.ScopeAndName(), v.DType())
	}
	t, err := v.Value()
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", v.ScopeAndName(), err)
	}
	return tensors.MustCopyFlatData[float32](t), nil
}

// SetFloat32s replaces a float32 variable's value with values, keeping its shape.
func SetFloat32s(v *context.Variable, values []float32) error {
	if v.Shape().Size() != len(values) {
		return fmt.Errorf("variable %s holds %d values, got %d", v.ScopeAndName(), v.Shape().Size(), len(values))
	}
	return v.SetValue(tensors.FromFlatDataAndDimensions(slices.Clone(values), v.Shape().Dimensions...))
}

// NewVariable creates (or returns, if it exists) the float32 variable name in ctx's scope with
// the given values and dimensions.
func NewVariable(ctx *context.Context, name string, values []float32, dims ...int) *context.Variable {
	return ctx.Checked(false).VariableWithValue(name, tensors.FromFlatDataAndDimensions(values, dims...))
}

// NewRand returns the deterministic random source methods initialize their weights with, so a
// method with the same seed starts from the same values on every backend and in every process.
func NewRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 0x5851f42d4c957f2d)) }

// Uniform returns n values drawn uniformly from [-bound, bound).
func Uniform(rng *rand.Rand, n int, bound float64) []float32 {
	values := make([]float32, n)
	for i := range values {
		values[i] = float32((2*rng.Float64() - 1) * bound)
	}
	return values
}

// Normal returns n values drawn from N(0, std²).
func Normal(rng *rand.Rand, n int, std float64) []float32 {
	values := make([]float32, n)
	for i := range values {
		values[i] = float32(rng.NormFloat64() * std)
	}
	return values
}
