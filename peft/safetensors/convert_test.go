package safetensors

import (
	"math"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/gomlx/gopjrt/dtypes/bfloat16"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/x448/float16"
)

func TestToGoMLX(t *testing.T) {
	f32 := FromFloat32("w", []int{2, 2}, []float32{1, 2, 3, 4})
	gt, err := f32.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, dtypes.Float32, gt.DType())
	assert.Equal(t, []int{2, 2}, gt.Shape().Dimensions)
	assert.Equal(t, [][]float32{{1, 2}, {3, 4}}, gt.Value())

	half := Tensor{Name: "h", DType: F16, Shape: []int{2}, Data: []byte{0x00, 0x3c, 0x00, 0xc1}}
	gt, err = half.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, -2.5}, gt.Value())

	bf := Tensor{Name: "b", DType: BF16, Shape: []int{}, Data: []byte{0x20, 0xc0}}
	gt, err = bf.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, float32(-2.5), gt.Value())

	u8 := FromUint8("u", []int{3}, []uint8{0, 7, 255})
	gt, err = u8.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, []uint8{0, 7, 255}, gt.Value())

	i64 := FromInt64("i", []int{2}, []int64{-1, math.MaxInt64})
	gt, err = i64.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, []int64{-1, math.MaxInt64}, gt.Value())

	i32 := Tensor{Name: "i32", DType: I32, Shape: []int{2}, Data: []byte{0xff, 0xff, 0xff, 0xff, 5, 0, 0, 0}}
	gt, err = i32.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, []int32{-1, 5}, gt.Value())

	b := Tensor{Name: "m", DType: BOOL, Shape: []int{3}, Data: []byte{0, 1, 2}}
	gt, err = b.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, []bool{false, true, true}, gt.Value())

	empty := Tensor{Name: "e", DType: F32, Shape: []int{0, 3}, Data: nil}
	gt, err = empty.ToGoMLX()
	require.NoError(t, err)
	assert.Equal(t, []int{0, 3}, gt.Shape().Dimensions)

	_, err = (&Tensor{Name: "bad", DType: F32, Shape: []int{2}, Data: []byte{1}}).ToGoMLX()
	assert.ErrorContains(t, err, `tensor "bad"`)
}

func TestFromGoMLXRoundTrip(t *testing.T) {
	cases := []*tensors.Tensor{
		tensors.FromValue([][]float32{{1, -2}, {3.5, 4}}),
		tensors.FromValue([]float64{0.1, -1e300}),
		tensors.FromValue([]uint8{0, 255}),
		tensors.FromValue([]int32{-7, 1 << 30}),
		tensors.FromValue([]int64{-7, 1 << 60}),
		tensors.FromFlatDataAndDimensions([]int16{-7, 300}, 2),
		tensors.FromFlatDataAndDimensions([]int8{-7, 100}, 2),
		tensors.FromValue([]bool{true, false}),
		tensors.FromScalar(float32(3)),
		tensors.FromShape(tensors.FromValue([]float32{1}).Shape()), // zero-valued
	}
	for _, gt := range cases {
		st, err := FromGoMLX("x", gt)
		require.NoError(t, err, gt.Shape().String())
		assert.Equal(t, nilToEmpty(gt.Shape().Dimensions), nilToEmpty(st.Shape))
		// Through the file format and back.
		enc, err := Encode([]Tensor{st}, nil)
		require.NoError(t, err)
		f, err := Parse(enc)
		require.NoError(t, err)
		back, err := f.Tensors[0].ToGoMLX()
		require.NoError(t, err)
		assert.Equal(t, gt.Value(), back.Value(), gt.Shape().String())
	}

	// Scalars get an empty (not nil) shape.
	st, err := FromGoMLX("s", tensors.FromScalar(int64(5)))
	require.NoError(t, err)
	assert.Equal(t, []int{}, st.Shape)

	// Half-precision GoMLX tensors keep their encoding and read back as float32.
	bf := tensors.FromFlatDataAndDimensions([]bfloat16.BFloat16{bfloat16.FromFloat32(1), bfloat16.FromFloat32(-2.5)}, 2)
	st, err = FromGoMLX("bf", bf)
	require.NoError(t, err)
	assert.Equal(t, BF16, st.DType)
	assert.Equal(t, []byte{0x80, 0x3f, 0x20, 0xc0}, st.Data)
	v, err := st.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, -2.5}, v)

	h := tensors.FromFlatDataAndDimensions([]float16.Float16{float16.Fromfloat32(65504), float16.Fromfloat32(-2.5)}, 2)
	st, err = FromGoMLX("h", h)
	require.NoError(t, err)
	assert.Equal(t, F16, st.DType)
	assert.Equal(t, []byte{0xff, 0x7b, 0x00, 0xc1}, st.Data)

	// Unsupported dtype and nil.
	_, err = FromGoMLX("u32", tensors.FromValue([]uint32{1}))
	assert.ErrorContains(t, err, `tensor "u32"`)
	_, err = FromGoMLX("nil", nil)
	assert.ErrorContains(t, err, `tensor "nil"`)
}

func nilToEmpty(s []int) []int {
	if len(s) == 0 {
		return nil
	}
	return s
}
