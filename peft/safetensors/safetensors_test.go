package safetensors

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sampleTensors covers several dtypes, a scalar and a zero-size tensor, given
// out of name order.
func sampleTensors() []Tensor {
	return []Tensor{
		FromFloat32("model.w", []int{2, 3}, []float32{1, -2, 3.5, 0, float32(math.Inf(1)), 1e-30}),
		{Name: "b.half", DType: F16, Shape: []int{2}, Data: []byte{0x00, 0x3c, 0x00, 0xc1}},
		{Name: "c.bf", DType: BF16, Shape: []int{}, Data: []byte{0x80, 0x3f}},
		FromInt64("ids", []int{3}, []int64{1, -1, math.MaxInt64}),
		FromUint8("codes", []int{4, 1}, []uint8{0, 1, 254, 255}),
		{Name: "empty", DType: F32, Shape: []int{0, 5}, Data: []byte{}},
		{Name: "flags", DType: BOOL, Shape: []int{2}, Data: []byte{0, 1}},
		{Name: "name with \"quotes\" & <html> é", DType: I8, Shape: []int{1}, Data: []byte{0x80}},
	}
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "adapter_model.safetensors")
	in := sampleTensors()
	md := map[string]string{"format": "pt", "note": "ünïcode \"q\""}
	require.NoError(t, Write(path, in, md))

	f, err := Read(path)
	require.NoError(t, err)
	assert.Equal(t, md, f.Metadata)
	require.Len(t, f.Tensors, len(in))
	for _, want := range in {
		got, ok := f.Get(want.Name)
		require.True(t, ok, want.Name)
		assert.Equal(t, want.DType, got.DType, want.Name)
		assert.Equal(t, want.Shape, got.Shape, want.Name)
		assert.Equal(t, want.Data, got.Data, want.Name)
	}
	_, ok := f.Get("missing")
	assert.False(t, ok)

	// Written sorted by name, so file order (by offsets) is name order.
	for i := 1; i < len(f.Tensors); i++ {
		assert.Less(t, f.Tensors[i-1].Name, f.Tensors[i].Name)
	}

	// Header padded with spaces to a multiple of 8.
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	n := binary.LittleEndian.Uint64(raw)
	assert.Zero(t, n%8)
	assert.True(t, strings.HasPrefix(string(raw[8:]), `{"__metadata__":{"format":"pt"`), string(raw[8:8+n]))

	// Deterministic: the input order does not matter.
	rev := sampleTensors()
	for i, j := 0, len(rev)-1; i < j; i, j = i+1, j-1 {
		rev[i], rev[j] = rev[j], rev[i]
	}
	enc, err := Encode(rev, md)
	require.NoError(t, err)
	assert.Equal(t, raw, enc)

	// No metadata: parsed as an empty map, no "__metadata__" written.
	enc, err = Encode(in[:1], nil)
	require.NoError(t, err)
	assert.NotContains(t, string(enc), "__metadata__")
	f, err = Parse(enc)
	require.NoError(t, err)
	assert.NotNil(t, f.Metadata)
	assert.Empty(t, f.Metadata)
}

func TestParseNoTensors(t *testing.T) {
	f, err := Parse(append([]byte{2, 0, 0, 0, 0, 0, 0, 0}, "{}"...))
	require.NoError(t, err)
	assert.Empty(t, f.Tensors)
	f, err = Parse(withHeader(`{"__metadata__":null}`, nil))
	require.NoError(t, err)
	assert.Empty(t, f.Metadata)
}

// withHeader builds an encoding from a raw header and a data section.
func withHeader(header string, body []byte) []byte {
	out := make([]byte, 8, 8+len(header)+len(body))
	binary.LittleEndian.PutUint64(out, uint64(len(header)))
	out = append(out, header...)
	return append(out, body...)
}

func TestParseErrors(t *testing.T) {
	lengthOnly := func(n uint64, total int) []byte {
		b := make([]byte, total)
		binary.LittleEndian.PutUint64(b, n)
		return b
	}
	f32 := func(name, shape, offsets string) string {
		return `"` + name + `":{"dtype":"F32","shape":` + shape + `,"data_offsets":` + offsets + `}`
	}
	body8 := make([]byte, 8)
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "shorter than the 8-byte"},
		{"short", []byte{1, 2, 3}, "shorter than the 8-byte"},
		{"header beyond input", lengthOnly(1000, 20), "header length 1000 exceeds the 12 bytes"},
		{"header length huge", lengthOnly(math.MaxUint64, 8), "exceeds the 0 bytes"},
		{"invalid JSON", withHeader(`{"w":`, nil), "invalid JSON"},
		{"not JSON", withHeader(`hello`, nil), "invalid JSON"},
		{"not an object", withHeader(`[1,2]`, nil), "not a JSON object"},
		{"string header", withHeader(`"x"`, nil), "not a JSON object"},
		{"data after object", withHeader(`{} {}`, nil), "data after the header object"},
		{"duplicate name", withHeader(`{`+f32("w", "[1]", "[0,4]")+`,`+f32("w", "[1]", "[4,8]")+`}`, body8), `duplicate key "w"`},
		{"entry not object", withHeader(`{"w":5}`, nil), `tensor "w": entry is not a JSON object`},
		{"missing dtype", withHeader(`{"w":{"shape":[],"data_offsets":[0,4]}}`, body8[:4]), `tensor "w": missing dtype`},
		{"dtype key case", withHeader(`{"w":{"DTYPE":"F32","shape":[],"data_offsets":[0,4]}}`, body8[:4]), `tensor "w": missing dtype`},
		{"duplicate field", withHeader(`{"w":{"dtype":"F32","dtype":"F16","shape":[],"data_offsets":[0,4]}}`, body8[:4]), `tensor "w": duplicate key "dtype"`},
		{"unknown dtype", withHeader(`{"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}`, body8[:1]), `tensor "w": unknown dtype "F8_E4M3"`},
		{"dtype not string", withHeader(`{"w":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}`, body8[:1]), `tensor "w": dtype:`},
		{"missing shape", withHeader(`{"w":{"dtype":"F32","data_offsets":[0,4]}}`, body8[:4]), `tensor "w": missing shape`},
		{"negative dim", withHeader(`{`+f32("w", "[2,-1]", "[0,8]")+`}`, body8), `tensor "w": shape: negative dimension -1 at axis 1`},
		{"fractional dim", withHeader(`{`+f32("w", "[1.5]", "[0,8]")+`}`, body8), `tensor "w": shape: dimension 0 is 1.5, not an integer`},
		{"string dim", withHeader(`{`+f32("w", `["2"]`, "[0,8]")+`}`, body8), `tensor "w": shape: dimension 0 is "2", not an integer`},
		{"dim beyond int64", withHeader(`{`+f32("w", `[99999999999999999999]`, "[0,8]")+`}`, body8), `tensor "w": shape: dimension 0`},
		{"shape overflow", withHeader(`{`+f32("w", "[4294967296,4294967296]", "[0,8]")+`}`, body8), `tensor "w": shape [4294967296 4294967296]: number of elements overflows`},
		{"shape overflow before zero", withHeader(`{`+f32("w", "[4294967296,4294967296,0]", "[0,0]")+`}`, nil), `tensor "w": shape`},
		{"byte size overflow", withHeader(`{`+f32("w", "[4611686018427387904]", "[0,8]")+`}`, body8), `tensor "w": shape [4611686018427387904] of F32: byte size overflows`},
		{"offsets missing", withHeader(`{"w":{"dtype":"F32","shape":[1]}}`, body8[:4]), `tensor "w": data_offsets must be 2 integers, got 0`},
		{"offsets three", withHeader(`{`+f32("w", "[1]", "[0,4,8]")+`}`, body8), `tensor "w": data_offsets must be 2 integers, got 3`},
		{"offsets not list", withHeader(`{`+f32("w", "[1]", `"0-4"`)+`}`, body8), `tensor "w": data_offsets:`},
		{"offset negative", withHeader(`{`+f32("w", "[1]", "[-4,0]")+`}`, body8), `tensor "w": data_offsets[0] is -4, not a non-negative integer`},
		{"offset float", withHeader(`{`+f32("w", "[1]", "[0,4.0]")+`}`, body8), `tensor "w": data_offsets[1] is 4.0`},
		{"begin after end", withHeader(`{`+f32("w", "[1]", "[8,4]")+`}`, body8), `tensor "w": data_offsets [8, 4]: begin > end`},
		{"end beyond data", withHeader(`{`+f32("w", "[4]", "[0,16]")+`}`, body8), `tensor "w": data_offsets [0, 16] reach beyond the 8-byte data section`},
		{"end way beyond", withHeader(`{`+f32("w", "[1]", "[18446744073709551611,18446744073709551615]")+`}`, body8), `tensor "w": data_offsets [18446744073709551611, 18446744073709551615] reach beyond`},
		{"byte count mismatch", withHeader(`{`+f32("w", "[1]", "[0,8]")+`}`, body8), `tensor "w": data_offsets [0, 8] hold 8 bytes, but F32[1] needs 4`},
		{"overlap", withHeader(`{`+f32("a", "[2]", "[0,8]")+`,`+f32("b", "[2]", "[4,12]")+`}`, make([]byte, 12)), `tensor "b": data_offsets [4, 12] overlap tensor "a"`},
		{"same range", withHeader(`{`+f32("a", "[2]", "[0,8]")+`,`+f32("b", "[2]", "[0,8]")+`}`, body8), `overlap tensor`},
		{"hole", withHeader(`{`+f32("a", "[1]", "[0,4]")+`,`+f32("b", "[1]", "[8,12]")+`}`, make([]byte, 12)), `tensor "b": data_offsets [8, 12] leave a hole of 4 bytes`},
		{"trailing bytes", withHeader(`{`+f32("a", "[1]", "[0,4]")+`}`, body8), "4 trailing bytes"},
		{"metadata not object", withHeader(`{"__metadata__":[1]}`, nil), "__metadata__: must be an object of strings"},
		{"metadata number", withHeader(`{"__metadata__":{"format":1}}`, nil), `__metadata__: value of "format" is not a string`},
		{"metadata nested", withHeader(`{"__metadata__":{"format":{"a":"b"}}}`, nil), `value of "format" is not a string`},
		{"metadata duplicate", withHeader(`{"__metadata__":{"a":"1","a":"2"}}`, nil), `duplicate key "a"`},
		{"metadata twice", withHeader(`{"__metadata__":{},"__metadata__":{}}`, nil), `duplicate key "__metadata__"`},
		{"deep nesting", withHeader(`{"w":`+strings.Repeat("[", 20000)+strings.Repeat("]", 20000)+`}`, nil), "invalid JSON"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Parse(tc.data)
			require.Error(t, err)
			assert.Nil(t, f)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestParseHeaderCap(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates 100 MB")
	}
	data := make([]byte, 8+MaxHeaderSize+1)
	binary.LittleEndian.PutUint64(data, MaxHeaderSize+1)
	_, err := Parse(data)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "exceeds the 100000000-byte limit")
}

func TestParseDoesNotAllocateFromHeaderLength(t *testing.T) {
	data := make([]byte, 16)
	binary.LittleEndian.PutUint64(data, 1<<62)
	allocs := testing.AllocsPerRun(10, func() { _, _ = Parse(data) })
	assert.Less(t, allocs, 10.0)
}

func TestReadErrors(t *testing.T) {
	dir := t.TempDir()
	_, err := Read(filepath.Join(dir, "missing.safetensors"))
	require.Error(t, err)

	_, err = Read(dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not a regular file")

	short := filepath.Join(dir, "short")
	require.NoError(t, os.WriteFile(short, []byte{1, 2}, 0o644))
	_, err = Read(short)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "shorter than the 8-byte")

	big := filepath.Join(dir, "big")
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b, 1<<40)
	require.NoError(t, os.WriteFile(big, b, 0o644))
	_, err = Read(big)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "header length 1099511627776 exceeds")

	bad := filepath.Join(dir, "bad")
	require.NoError(t, os.WriteFile(bad, withHeader(`{"w":{"dtype":"X","shape":[],"data_offsets":[0,0]}}`, nil), 0o644))
	_, err = Read(bad)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `tensor "w": unknown dtype "X"`)
	assert.Contains(t, err.Error(), bad)
}

func TestEncodeErrors(t *testing.T) {
	good := FromFloat32("w", []int{2}, []float32{1, 2})
	tests := []struct {
		name    string
		tensors []Tensor
		md      map[string]string
		want    string
	}{
		{"duplicate", []Tensor{good, good}, nil, `duplicate tensor name "w"`},
		{"short data", []Tensor{FromFloat32("w", []int{3}, []float32{1, 2})}, nil, `tensor "w": has 8 bytes of data, but F32[3] needs 12`},
		{"unknown dtype", []Tensor{{Name: "w", DType: "F8", Shape: []int{1}, Data: []byte{0}}}, nil, `tensor "w": unknown dtype "F8"`},
		{"negative dim", []Tensor{{Name: "w", DType: U8, Shape: []int{-1}}}, nil, `tensor "w": negative dimension`},
		{"overflow", []Tensor{{Name: "w", DType: U8, Shape: []int{math.MaxInt, 2}}}, nil, `tensor "w": shape`},
		{"reserved name", []Tensor{{Name: "__metadata__", DType: U8, Shape: []int{0}}}, nil, `reserved`},
		{"bad utf8 name", []Tensor{{Name: "\xff", DType: U8, Shape: []int{0}}}, nil, `not valid UTF-8`},
		{"bad utf8 metadata", nil, map[string]string{"k": "\xff"}, `metadata key "k"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Encode(tc.tensors, tc.md)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestWriteAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "model.safetensors")
	require.NoError(t, Write(path, []Tensor{FromFloat32("w", []int{1}, []float32{42})}, map[string]string{"v": "1"}))
	before, err := os.ReadFile(path)
	require.NoError(t, err)
	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o644), info.Mode().Perm())

	dup := []Tensor{FromFloat32("a", []int{1}, []float32{1}), FromFloat32("a", []int{1}, []float32{2})}
	require.ErrorContains(t, Write(path, dup, nil), "duplicate")
	mismatch := []Tensor{FromFloat32("a", []int{2}, []float32{1})}
	require.ErrorContains(t, Write(path, mismatch, nil), "needs 8")

	after, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, before, after, "old file intact")

	// A failure after the temporary file exists (renaming over a directory)
	// removes the temporary file.
	sub := filepath.Join(dir, "adir")
	require.NoError(t, os.Mkdir(sub, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(sub, "keep"), nil, 0o644))
	require.Error(t, Write(sub, []Tensor{FromFloat32("w", []int{1}, []float32{1})}, nil))

	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"adir", "model.safetensors"}, names, "no temporary files left behind")

	// Overwriting with valid content replaces the file.
	require.NoError(t, Write(path, []Tensor{FromFloat32("w", []int{1}, []float32{7})}, nil))
	f, err := Read(path)
	require.NoError(t, err)
	v, err := f.Tensors[0].Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{7}, v)

	// A relative path in the current directory works.
	t.Chdir(dir)
	require.NoError(t, Write("rel.safetensors", nil, nil))
	_, err = Read("rel.safetensors")
	require.NoError(t, err)
}

func TestF16Decoding(t *testing.T) {
	tests := []struct {
		bits uint16
		want float32
	}{
		{0x3c00, 1.0},
		{0xc100, -2.5},
		{0x7bff, 65504},
		{0xfbff, -65504},
		{0x0001, 5.9604644775390625e-08}, // smallest subnormal, 2⁻²⁴
		{0x03ff, 6.097555160522461e-05},  // largest subnormal, 1023 × 2⁻²⁴
		{0x8200, -3.0517578125e-05},      // negative subnormal, -512 × 2⁻²⁴
		{0x0400, 6.103515625e-05},        // smallest normal, 2⁻¹⁴
		{0x3555, 0.333251953125},
		{0x0000, 0},
		{0x7c00, float32(math.Inf(1))},
		{0xfc00, float32(math.Inf(-1))},
	}
	for _, tc := range tests {
		got := F16ToFloat32(tc.bits)
		assert.Equal(t, math.Float32bits(tc.want), math.Float32bits(got), "bits %#04x: got %g want %g", tc.bits, got, tc.want)
	}
	negZero := F16ToFloat32(0x8000)
	assert.Equal(t, uint32(0x80000000), math.Float32bits(negZero), "-0 keeps its sign")
	for _, nan := range []uint16{0x7e00, 0x7c01, 0xfe00} {
		assert.True(t, math.IsNaN(float64(F16ToFloat32(nan))), "%#04x", nan)
	}
	assert.Equal(t, uint32(0xffc00000), math.Float32bits(F16ToFloat32(0xfe00)), "sign and quiet bit kept")

	// Through a tensor.
	tensor := Tensor{Name: "h", DType: F16, Shape: []int{3}, Data: []byte{0x00, 0x3c, 0x00, 0xc1, 0xff, 0x7b}}
	v, err := tensor.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, -2.5, 65504}, v)
}

func TestBF16Decoding(t *testing.T) {
	tests := []struct {
		bits uint16
		want float32
	}{
		{0x3f80, 1.0},
		{0xc020, -2.5},
		{0x4780, 65536},
		{0x477f, 65280},
		{0x7f7f, 3.3895313892515355e+38}, // largest finite
		{0x0001, 9.183549615799121e-41},  // smallest subnormal, 2⁻¹³³
		{0x8040, -5.877471754111438e-39}, // negative subnormal, -2⁻¹²⁷
		{0x0080, 1.1754943508222875e-38}, // smallest normal, 2⁻¹²⁶
		{0x7f80, float32(math.Inf(1))},
		{0xff80, float32(math.Inf(-1))},
	}
	for _, tc := range tests {
		got := BF16ToFloat32(tc.bits)
		assert.Equal(t, math.Float32bits(tc.want), math.Float32bits(got), "bits %#04x: got %g want %g", tc.bits, got, tc.want)
	}
	assert.True(t, math.IsNaN(float64(BF16ToFloat32(0x7fc0))))

	tensor := Tensor{Name: "b", DType: BF16, Shape: []int{2}, Data: []byte{0x80, 0x3f, 0x20, 0xc0}}
	v, err := tensor.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{1, -2.5}, v)
}

func TestFloat32s(t *testing.T) {
	f64 := Tensor{Name: "d", DType: F64, Shape: []int{2}, Data: make([]byte, 16)}
	binary.LittleEndian.PutUint64(f64.Data, math.Float64bits(0.1))
	binary.LittleEndian.PutUint64(f64.Data[8:], math.Float64bits(-1e300))
	v, err := f64.Float32s()
	require.NoError(t, err)
	assert.Equal(t, []float32{0.1, float32(math.Inf(-1))}, v)

	_, err = (&Tensor{Name: "u", DType: U8, Shape: []int{1}, Data: []byte{1}}).Float32s()
	assert.ErrorContains(t, err, `tensor "u": cannot convert U8 to float32`)
	_, err = (&Tensor{Name: "x", DType: F32, Shape: []int{2}, Data: []byte{1}}).Float32s()
	assert.ErrorContains(t, err, `tensor "x": has 1 bytes of data, but F32[2] needs 8`)
	_, err = (&Tensor{Name: "y", DType: "nope", Shape: []int{1}}).Float32s()
	assert.ErrorContains(t, err, `tensor "y": unknown dtype "nope"`)
}

func TestFromHelpers(t *testing.T) {
	shape := []int{2}
	f := FromFloat32("f", shape, []float32{1, -2.5})
	shape[0] = 99 // the shape is copied
	assert.Equal(t, []int{2}, f.Shape)
	assert.Equal(t, []byte{0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0}, f.Data)

	i := FromInt64("i", []int{1}, []int64{-2})
	assert.Equal(t, I64, i.DType)
	assert.Equal(t, []byte{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, i.Data)

	vals := []uint8{1, 2}
	u := FromUint8("u", []int{2}, vals)
	vals[0] = 9 // the values are copied
	assert.Equal(t, []byte{1, 2}, u.Data)

	assert.True(t, bytes.Equal(u.Data, []byte{1, 2}))
	assert.Equal(t, 4, F32.Size())
	assert.Equal(t, 0, DType("F8").Size())
}
