package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/gomlx/gopjrt/dtypes/bfloat16"
	"github.com/x448/float16"
)

// checkData verifies that t is self-consistent (known dtype, valid shape,
// matching byte count) and returns its number of elements.
func (t *Tensor) checkData() (int, error) {
	want, err := byteSize(t.DType, t.Shape)
	if err != nil {
		return 0, fmt.Errorf("safetensors: tensor %q: %w", t.Name, err)
	}
	if len(t.Data) != want {
		return 0, fmt.Errorf("safetensors: tensor %q: has %d bytes of data, but %s%v needs %d",
			t.Name, len(t.Data), t.DType, t.Shape, want)
	}
	return want / t.DType.Size(), nil
}

// Float32s decodes the tensor's values as float32 (row-major). F32, F16, BF16
// and F64 are accepted; F16 and BF16 are decoded exactly (subnormals, ±Inf and
// NaN included), F64 is rounded to the nearest float32.
func (t *Tensor) Float32s() ([]float32, error) {
	n, err := t.checkData()
	if err != nil {
		return nil, err
	}
	out := make([]float32, n)
	d := t.Data
	switch t.DType {
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(d[4*i:]))
		}
	case F16:
		for i := range out {
			out[i] = F16ToFloat32(binary.LittleEndian.Uint16(d[2*i:]))
		}
	case BF16:
		for i := range out {
			out[i] = BF16ToFloat32(binary.LittleEndian.Uint16(d[2*i:]))
		}
	case F64:
		for i := range out {
			out[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(d[8*i:])))
		}
	default:
		return nil, fmt.Errorf("safetensors: tensor %q: cannot convert %s to float32", t.Name, t.DType)
	}
	return out, nil
}

// F16ToFloat32 decodes an IEEE 754 binary16 value given by its bits. Every
// binary16 value, subnormals, infinities and NaN payloads included, is exactly
// representable as a float32.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch exp {
	case 0:
		// Zero or subnormal: mant × 2⁻²⁴, exact in float32.
		v := float32(mant) * (1.0 / (1 << 24))
		return math.Float32frombits(math.Float32bits(v) | sign)
	case 0x1f:
		// Inf (mant == 0) or NaN (payload kept, quiet bit included).
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	default:
		return math.Float32frombits(sign | (exp-15+127)<<23 | mant<<13)
	}
}

// BF16ToFloat32 decodes a bfloat16 value given by its bits (the top half of a
// float32).
func BF16ToFloat32(b uint16) float32 {
	return math.Float32frombits(uint32(b) << 16)
}

// FromFloat32 returns an F32 tensor holding values (copied) with the given
// shape. The shape is not checked here; Encode and Write reject a mismatch.
func FromFloat32(name string, shape []int, values []float32) Tensor {
	data := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
	}
	return Tensor{Name: name, DType: F32, Shape: slices.Clone(shape), Data: data}
}

// FromInt64 returns an I64 tensor holding values (copied) with the given
// shape. The shape is not checked here; Encode and Write reject a mismatch.
func FromInt64(name string, shape []int, values []int64) Tensor {
	data := make([]byte, 8*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint64(data[8*i:], uint64(v))
	}
	return Tensor{Name: name, DType: I64, Shape: slices.Clone(shape), Data: data}
}

// FromUint8 returns a U8 tensor holding values (copied) with the given shape.
// The shape is not checked here; Encode and Write reject a mismatch.
func FromUint8(name string, shape []int, values []uint8) Tensor {
	return Tensor{Name: name, DType: U8, Shape: slices.Clone(shape), Data: slices.Clone(values)}
}

// ToGoMLX converts the tensor to a local GoMLX tensor with the same shape:
// F32, F16 and BF16 become float32; F64 float64; I64 int64; I32 int32; I16
// int16; I8 int8; U8 uint8; BOOL bool (any non-zero byte is true).
func (t *Tensor) ToGoMLX() (result *tensors.Tensor, err error) {
	n, err := t.checkData()
	if err != nil {
		return nil, err
	}
	defer func() { // GoMLX reports some failures by panicking
		if r := recover(); r != nil {
			result, err = nil, fmt.Errorf("safetensors: tensor %q: converting to GoMLX: %v", t.Name, r)
		}
	}()
	d := t.Data
	switch t.DType {
	case F32, F16, BF16:
		values, err := t.Float32s()
		if err != nil {
			return nil, err
		}
		return newGoMLX(t, dtypes.Float32, values)
	case F64:
		return decodeInto(t, dtypes.Float64, n, func(i int) float64 {
			return math.Float64frombits(binary.LittleEndian.Uint64(d[8*i:]))
		})
	case I64:
		return decodeInto(t, dtypes.Int64, n, func(i int) int64 { return int64(binary.LittleEndian.Uint64(d[8*i:])) })
	case U64:
		return decodeInto(t, dtypes.Uint64, n, func(i int) uint64 { return binary.LittleEndian.Uint64(d[8*i:]) })
	case I32:
		return decodeInto(t, dtypes.Int32, n, func(i int) int32 { return int32(binary.LittleEndian.Uint32(d[4*i:])) })
	case I16:
		return decodeInto(t, dtypes.Int16, n, func(i int) int16 { return int16(binary.LittleEndian.Uint16(d[2*i:])) })
	case I8:
		return decodeInto(t, dtypes.Int8, n, func(i int) int8 { return int8(d[i]) })
	case U8:
		return newGoMLX(t, dtypes.Uint8, d)
	case BOOL:
		return decodeInto(t, dtypes.Bool, n, func(i int) bool { return d[i] != 0 })
	}
	return nil, fmt.Errorf("safetensors: tensor %q: cannot convert %s to GoMLX", t.Name, t.DType)
}

// newGoMLX creates a GoMLX tensor of t's shape and copies values into it.
func newGoMLX[T dtypes.Supported](t *Tensor, dtype dtypes.DType, values []T) (*tensors.Tensor, error) {
	out := tensors.FromShape(shapes.Make(dtype, t.Shape...))
	if len(values) == 0 {
		return out, nil
	}
	if err := tensors.MutableFlatData(out, func(flat []T) { copy(flat, values) }); err != nil {
		return nil, fmt.Errorf("safetensors: tensor %q: %w", t.Name, err)
	}
	return out, nil
}

// decodeInto creates a GoMLX tensor of t's shape and fills element i with at(i).
func decodeInto[T dtypes.Supported](t *Tensor, dtype dtypes.DType, n int, at func(i int) T) (*tensors.Tensor, error) {
	out := tensors.FromShape(shapes.Make(dtype, t.Shape...))
	if n == 0 {
		return out, nil
	}
	if err := tensors.MutableFlatData(out, func(flat []T) {
		for i := range flat {
			flat[i] = at(i)
		}
	}); err != nil {
		return nil, fmt.Errorf("safetensors: tensor %q: %w", t.Name, err)
	}
	return out, nil
}

// FromGoMLX converts a GoMLX tensor to a safetensors Tensor of the same shape
// and element type: float32 → F32, float64 → F64, bfloat16 → BF16, float16 →
// F16, int64 → I64, uint64 → U64, int32 → I32, int16 → I16, int8 → I8, uint8 → U8, bool →
// BOOL. Other dtypes are an error. A tensor that lives only on a device is
// copied to the host first.
func FromGoMLX(name string, t *tensors.Tensor) (result Tensor, err error) {
	if t == nil {
		return Tensor{}, fmt.Errorf("safetensors: tensor %q: nil GoMLX tensor", name)
	}
	defer func() { // GoMLX reports some failures by panicking
		if r := recover(); r != nil {
			result, err = Tensor{}, fmt.Errorf("safetensors: tensor %q: converting from GoMLX: %v", name, r)
		}
	}()
	if err := t.CheckValid(); err != nil {
		return Tensor{}, fmt.Errorf("safetensors: tensor %q: %w", name, err)
	}
	shape := t.Shape()
	if shape.IsTuple() {
		return Tensor{}, fmt.Errorf("safetensors: tensor %q: tuples cannot be stored", name)
	}
	out := Tensor{Name: name, Shape: slices.Clone(shape.Dimensions)}
	if out.Shape == nil {
		out.Shape = []int{}
	}
	switch shape.DType {
	case dtypes.Float32:
		out.DType = F32
		err = encodeFrom(t, &out, 4, func(b []byte, v float32) { binary.LittleEndian.PutUint32(b, math.Float32bits(v)) })
	case dtypes.Float64:
		out.DType = F64
		err = encodeFrom(t, &out, 8, func(b []byte, v float64) { binary.LittleEndian.PutUint64(b, math.Float64bits(v)) })
	case dtypes.BFloat16:
		out.DType = BF16
		err = encodeFrom(t, &out, 2, func(b []byte, v bfloat16.BFloat16) { binary.LittleEndian.PutUint16(b, v.Bits()) })
	case dtypes.Float16:
		out.DType = F16
		err = encodeFrom(t, &out, 2, func(b []byte, v float16.Float16) { binary.LittleEndian.PutUint16(b, v.Bits()) })
	case dtypes.Int64:
		out.DType = I64
		err = encodeFrom(t, &out, 8, func(b []byte, v int64) { binary.LittleEndian.PutUint64(b, uint64(v)) })
	case dtypes.Uint64:
		out.DType = U64
		err = encodeFrom(t, &out, 8, func(b []byte, v uint64) { binary.LittleEndian.PutUint64(b, v) })
	case dtypes.Int32:
		out.DType = I32
		err = encodeFrom(t, &out, 4, func(b []byte, v int32) { binary.LittleEndian.PutUint32(b, uint32(v)) })
	case dtypes.Int16:
		out.DType = I16
		err = encodeFrom(t, &out, 2, func(b []byte, v int16) { binary.LittleEndian.PutUint16(b, uint16(v)) })
	case dtypes.Int8:
		out.DType = I8
		err = encodeFrom(t, &out, 1, func(b []byte, v int8) { b[0] = byte(v) })
	case dtypes.Uint8:
		out.DType = U8
		err = encodeFrom(t, &out, 1, func(b []byte, v uint8) { b[0] = v })
	case dtypes.Bool:
		out.DType = BOOL
		err = encodeFrom(t, &out, 1, func(b []byte, v bool) {
			if v {
				b[0] = 1
			} else {
				b[0] = 0
			}
		})
	default:
		return Tensor{}, fmt.Errorf("safetensors: tensor %q: GoMLX dtype %s has no safetensors equivalent here", name, shape.DType)
	}
	if err != nil {
		return Tensor{}, fmt.Errorf("safetensors: tensor %q: %w", name, err)
	}
	return out, nil
}

// encodeFrom copies the flat values of t into out.Data, size bytes each.
func encodeFrom[T dtypes.Supported](t *tensors.Tensor, out *Tensor, size int, put func(b []byte, v T)) error {
	n := t.Shape().Size()
	out.Data = make([]byte, n*size)
	if n == 0 {
		return nil
	}
	return tensors.ConstFlatData(t, func(flat []T) {
		for i, v := range flat {
			put(out.Data[i*size:], v)
		}
	})
}
