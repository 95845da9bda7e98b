package bnb_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/bnb"
	"peft/peft/safetensors"
)

// FuzzReadFile: any safetensors file either is refused or gives 4-bit weights that dequantize to
// as many finite values as their shape holds. Seeds: quantized files of both types, with and
// without double quantization.
func FuzzReadFile(f *testing.F) {
	for _, opts := range []bnb.Options{{Type: bnb.NF4, BlockSize: 64, DoubleQuant: true}, {Type: bnb.FP4, BlockSize: 32}} {
		values := make([]float32, 3*64)
		for i := range values {
			values[i] = float32(i%7) - 3
		}
		q, err := bnb.Quantize(values, []int{3, 64}, opts)
		require.NoError(f, err)
		parts, err := q.Tensors("model.layers.0.mlp.down_proj.weight")
		require.NoError(f, err)
		data, err := safetensors.Encode(append(parts, safetensors.FromFloat32("model.norm.weight", []int{2}, []float32{1, 1})), nil)
		require.NoError(f, err)
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := safetensors.Parse(data)
		if err != nil {
			return
		}
		quantized, _, err := bnb.ReadFile(file)
		if err != nil {
			return
		}
		for name, q := range quantized {
			n := 1
			for _, d := range q.Shape {
				n *= d
			}
			values := q.Dequantize()
			require.Len(t, values, n, name)
		}
	})
}
