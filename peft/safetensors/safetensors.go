// Package safetensors reads and writes the safetensors format
// (https://github.com/huggingface/safetensors) and is meant to be safe on
// untrusted files: Parse validates everything before it hands out a tensor,
// never allocates from an untrusted size before checking it against the input,
// and never panics.
//
// Layout: 8 bytes little-endian uint64 N, then N bytes of JSON header, then the
// data section. The header maps each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
// start of the data section) and may hold "__metadata__", a string→string map.
// Tensor data is row-major and little-endian.
//
// Parse follows the format's rules strictly, like the reference Rust
// implementation: the tensors must tile the data section exactly (no overlap,
// no hole, no trailing bytes), and a name may appear only once.
//
// The whole file is held in memory (no mmap); tensors returned by Read and
// Parse share that one buffer.
package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"peft/peft/atomicfile"
	"sort"
	"strconv"
	"unicode/utf8"
)

// DType is a safetensors element type, as written in the header ("F32", …).
type DType string

// The element types this package reads and writes.
const (
	F32  DType = "F32"  // IEEE 754 binary32
	F16  DType = "F16"  // IEEE 754 binary16
	BF16 DType = "BF16" // bfloat16 (the top 16 bits of a binary32)
	F64  DType = "F64"  // IEEE 754 binary64
	I64  DType = "I64"  // signed 64-bit integer
	U64  DType = "U64"  // unsigned 64-bit integer (random-number states)
	I32  DType = "I32"  // signed 32-bit integer
	I16  DType = "I16"  // signed 16-bit integer
	I8   DType = "I8"   // signed 8-bit integer
	U8   DType = "U8"   // unsigned 8-bit integer
	BOOL DType = "BOOL" // one byte per element, 0 is false
)

// MaxHeaderSize is the largest JSON header Parse accepts, in bytes (the same
// cap as the reference implementation).
const MaxHeaderSize = 100_000_000

// metadataKey is the reserved header key for the string→string metadata.
const metadataKey = "__metadata__"

// Size returns the number of bytes of one element, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case F64, I64, U64:
		return 8
	case F32, I32:
		return 4
	case F16, BF16, I16:
		return 2
	case I8, U8, BOOL:
		return 1
	}
	return 0
}

// Tensor is one named tensor: its element type, its dimensions (row-major) and
// its raw little-endian bytes.
type Tensor struct {
	Name  string // unique within a file; "__metadata__" is reserved
	DType DType  // element type
	Shape []int  // dimensions, row-major; empty for a scalar
	Data  []byte // raw little-endian bytes, DType.Size() × product(Shape)
}

// File is the content of a safetensors file.
type File struct {
	// Tensors in the order of their offsets in the file.
	Tensors []Tensor
	// Metadata is the "__metadata__" map; never nil after Read or Parse.
	Metadata map[string]string

	index map[string]int // position of each name in Tensors, built by Read and Parse
}

// Get returns the tensor with the given name, if present. The pointer refers to
// the element of f.Tensors. It takes constant time on a file from Read or Parse (an index built
// then; a File changed or built by hand falls back to a scan).
func (f *File) Get(name string) (*Tensor, bool) {
	if i, ok := f.index[name]; ok && i < len(f.Tensors) && f.Tensors[i].Name == name {
		return &f.Tensors[i], true
	}
	for i := range f.Tensors {
		if f.Tensors[i].Name == name {
			return &f.Tensors[i], true
		}
	}
	return nil, false
}

// NumElements returns the product of the dimensions of t.Shape, or an error if
// a dimension is negative or the product overflows.
func (t *Tensor) NumElements() (int, error) {
	return numElements(t.Shape)
}

// numElements multiplies dims left to right, rejecting negative dimensions and
// overflow of any partial product.
func numElements(dims []int) (int, error) {
	n := 1
	for i, d := range dims {
		if d < 0 {
			return 0, fmt.Errorf("negative dimension %d at axis %d of shape %v", d, i, dims)
		}
		if d != 0 && n > math.MaxInt/d {
			return 0, fmt.Errorf("shape %v: number of elements overflows", dims)
		}
		n *= d
	}
	return n, nil
}

// byteSize returns the number of data bytes a tensor of this dtype and shape
// must have.
func byteSize(dtype DType, dims []int) (int, error) {
	size := dtype.Size()
	if size == 0 {
		return 0, fmt.Errorf("unknown dtype %q", dtype)
	}
	n, err := numElements(dims)
	if err != nil {
		return 0, err
	}
	if n > math.MaxInt/size {
		return 0, fmt.Errorf("shape %v of %s: byte size overflows", dims, dtype)
	}
	return n * size, nil
}

// Read reads and validates a safetensors file. The whole file is read into
// memory (after checking its size); see Parse for the validation.
func Read(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("safetensors: %s: not a regular file", path)
	}
	size := info.Size()
	if size < 8 {
		return nil, fmt.Errorf("safetensors: %s: file is %d bytes, shorter than the 8-byte header length", path, size)
	}
	if uint64(size) > uint64(math.MaxInt) {
		return nil, fmt.Errorf("safetensors: %s: file of %d bytes is too large for this platform", path, size)
	}
	// Check the header length against the file size before reading it all.
	var prefix [8]byte
	if _, err := io.ReadFull(f, prefix[:]); err != nil {
		return nil, fmt.Errorf("safetensors: %s: %w", path, err)
	}
	if n := binary.LittleEndian.Uint64(prefix[:]); n > uint64(size-8) {
		return nil, fmt.Errorf("safetensors: %s: header length %d exceeds the %d bytes after the length prefix", path, n, size-8)
	}
	data := make([]byte, size)
	copy(data, prefix[:])
	if _, err := io.ReadFull(f, data[8:]); err != nil {
		return nil, fmt.Errorf("safetensors: %s: reading %d bytes: %w", path, size, err)
	}
	// A file that grew while being read would be truncated silently.
	var probe [1]byte
	if n, _ := f.Read(probe[:]); n != 0 {
		return nil, fmt.Errorf("safetensors: %s: file changed size while being read", path)
	}
	file, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%w (file %s)", err, path)
	}
	return file, nil
}

// Parse validates a complete safetensors encoding and returns its tensors in
// the order of their offsets. The Data of each tensor is a sub-slice of data
// (no copy; its capacity is capped so appending cannot clobber a neighbour).
//
// Every violation is an error, naming the tensor when there is one: input
// shorter than 8 bytes; header length beyond the input (checked before
// anything of that size is allocated) or above MaxHeaderSize; header that is
// not a JSON object, has trailing data or a duplicate key; unknown dtype;
// shape not a list of non-negative integers or whose element or byte count
// overflows; data_offsets not two non-negative integers, begin > end, or end
// beyond the data section; byte count different from dtype size × number of
// elements; tensors that overlap, leave a hole, or leave trailing bytes;
// "__metadata__" that is not a string→string object. Parse never panics.
func Parse(data []byte) (*File, error) {
	if len(data) < 8 {
		return nil, fmt.Errorf("safetensors: input is %d bytes, shorter than the 8-byte header length", len(data))
	}
	n := binary.LittleEndian.Uint64(data[:8])
	if n > uint64(len(data)-8) {
		return nil, fmt.Errorf("safetensors: header length %d exceeds the %d bytes after the length prefix", n, len(data)-8)
	}
	if n > MaxHeaderSize {
		return nil, fmt.Errorf("safetensors: header length %d exceeds the %d-byte limit", n, MaxHeaderSize)
	}
	header := data[8 : 8+n]
	body := data[8+n:]

	entries, err := decodeObject(header)
	if err != nil {
		return nil, fmt.Errorf("safetensors: header: %w", err)
	}
	file := &File{Metadata: map[string]string{}}
	type span struct{ begin, end int }
	var spans []span
	for _, e := range entries {
		if e.key == metadataKey {
			if file.Metadata, err = decodeMetadata(e.value); err != nil {
				return nil, fmt.Errorf("safetensors: %s: %w", metadataKey, err)
			}
			continue
		}
		t, begin, end, err := decodeTensor(e.key, e.value, len(body))
		if err != nil {
			return nil, fmt.Errorf("safetensors: tensor %q: %w", e.key, err)
		}
		t.Data = body[begin:end:end]
		file.Tensors = append(file.Tensors, t)
		spans = append(spans, span{begin, end})
	}

	// Order by offsets, then require that the tensors tile the data section.
	order := make([]int, len(spans))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool {
		sa, sb := spans[order[a]], spans[order[b]]
		if sa.begin != sb.begin {
			return sa.begin < sb.begin
		}
		return sa.end < sb.end
	})
	sorted := make([]Tensor, len(order))
	pos, prev := 0, -1
	for i, idx := range order {
		s := spans[idx]
		switch {
		case s.begin < pos:
			return nil, fmt.Errorf("safetensors: tensor %q: data_offsets [%d, %d] overlap tensor %q",
				file.Tensors[idx].Name, s.begin, s.end, file.Tensors[prev].Name)
		case s.begin > pos:
			return nil, fmt.Errorf("safetensors: tensor %q: data_offsets [%d, %d] leave a hole of %d bytes before it",
				file.Tensors[idx].Name, s.begin, s.end, s.begin-pos)
		}
		sorted[i] = file.Tensors[idx]
		if s.end > s.begin || prev < 0 {
			prev = idx
		}
		pos = s.end
	}
	if pos != len(body) {
		return nil, fmt.Errorf("safetensors: %d trailing bytes after the last tensor are not covered by any tensor", len(body)-pos)
	}
	file.Tensors = sorted
	file.index = make(map[string]int, len(sorted))
	for i, t := range sorted {
		file.index[t.Name] = i
	}
	return file, nil
}

// rawEntry is one key of a JSON object with its undecoded value.
type rawEntry struct {
	key   string
	value json.RawMessage
}

// decodeObject decodes a JSON object into its entries, in order, rejecting
// duplicate keys and anything but whitespace after the object.
func decodeObject(data []byte) ([]rawEntry, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("not a JSON object (starts with %s)", describeToken(tok))
	}
	var entries []rawEntry
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("invalid JSON: object key is %s", describeToken(tok))
		}
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil, fmt.Errorf("invalid JSON in the value of %q: %w", key, err)
		}
		if seen[key] {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		entries = append(entries, rawEntry{key, value})
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("invalid JSON: data after the header object")
	}
	return entries, nil
}

func describeToken(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		return strconv.Quote(v.String())
	case string:
		return "a string"
	case nil:
		return "null"
	default:
		return fmt.Sprintf("%T", v)
	}
}

// decodeMetadata decodes the "__metadata__" value: a string→string object
// (null counts as empty).
func decodeMetadata(raw json.RawMessage) (map[string]string, error) {
	md := map[string]string{}
	if string(raw) == "null" {
		return md, nil
	}
	entries, err := decodeObject(raw)
	if err != nil {
		return nil, fmt.Errorf("must be an object of strings: %w", err)
	}
	for _, e := range entries {
		var s string
		if len(e.value) == 0 || e.value[0] != '"' {
			return nil, fmt.Errorf("value of %q is not a string", e.key)
		}
		if err := json.Unmarshal(e.value, &s); err != nil {
			return nil, fmt.Errorf("value of %q: %w", e.key, err)
		}
		md[e.key] = s
	}
	return md, nil
}

// decodeTensor validates one tensor entry against a data section of bodyLen
// bytes and returns the tensor (without Data) and its byte range. Keys are
// matched exactly and may not repeat; unknown keys are ignored, as the
// reference implementation does.
func decodeTensor(name string, raw json.RawMessage, bodyLen int) (t Tensor, begin, end int, err error) {
	if len(raw) == 0 || raw[0] != '{' {
		return t, 0, 0, errors.New("entry is not a JSON object")
	}
	entries, err := decodeObject(raw)
	if err != nil {
		return t, 0, 0, err
	}
	var h struct {
		DType       *string
		Shape       []json.RawMessage
		DataOffsets []json.RawMessage
	}
	for _, e := range entries {
		var target any
		switch e.key {
		case "dtype":
			target = &h.DType
		case "shape":
			target = &h.Shape
		case "data_offsets":
			target = &h.DataOffsets
		default:
			continue
		}
		if err := json.Unmarshal(e.value, target); err != nil {
			return t, 0, 0, fmt.Errorf("%s: %w", e.key, err)
		}
	}
	if h.DType == nil {
		return t, 0, 0, errors.New("missing dtype")
	}
	dtype := DType(*h.DType)
	if dtype.Size() == 0 {
		return t, 0, 0, fmt.Errorf("unknown dtype %q", *h.DType)
	}
	if h.Shape == nil {
		return t, 0, 0, errors.New("missing shape")
	}
	shape := make([]int, len(h.Shape))
	for i, r := range h.Shape {
		d, err := strconv.ParseInt(string(r), 10, 64)
		if err != nil {
			return t, 0, 0, fmt.Errorf("shape: dimension %d is %s, not an integer", i, truncate(string(r)))
		}
		if d < 0 {
			return t, 0, 0, fmt.Errorf("shape: negative dimension %d at axis %d", d, i)
		}
		if uint64(d) > uint64(math.MaxInt) {
			return t, 0, 0, fmt.Errorf("shape: dimension %d at axis %d is too large", d, i)
		}
		shape[i] = int(d)
	}
	want, err := byteSize(dtype, shape)
	if err != nil {
		return t, 0, 0, err
	}
	if len(h.DataOffsets) != 2 {
		return t, 0, 0, fmt.Errorf("data_offsets must be 2 integers, got %d values", len(h.DataOffsets))
	}
	var off [2]int
	for i, r := range h.DataOffsets {
		v, err := strconv.ParseUint(string(r), 10, 64)
		if err != nil {
			return t, 0, 0, fmt.Errorf("data_offsets[%d] is %s, not a non-negative integer", i, truncate(string(r)))
		}
		if v > uint64(bodyLen) {
			return t, 0, 0, fmt.Errorf("data_offsets [%s, %s] reach beyond the %d-byte data section",
				truncate(string(h.DataOffsets[0])), truncate(string(h.DataOffsets[1])), bodyLen)
		}
		off[i] = int(v)
	}
	begin, end = off[0], off[1]
	if begin > end {
		return t, 0, 0, fmt.Errorf("data_offsets [%d, %d]: begin > end", begin, end)
	}
	if end-begin != want {
		return t, 0, 0, fmt.Errorf("data_offsets [%d, %d] hold %d bytes, but %s%v needs %d",
			begin, end, end-begin, dtype, shape, want)
	}
	return Tensor{Name: name, DType: dtype, Shape: shape}, begin, end, nil
}

// truncate shortens untrusted text quoted in error messages.
func truncate(s string) string {
	const max = 40
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}

// Encode returns the safetensors encoding of the tensors, sorted by name, with
// the metadata (omitted when empty). The header is padded with spaces to a
// multiple of 8 bytes. It is an error if two tensors share a name, a name is
// "__metadata__", a name or metadata string is not valid UTF-8, a dtype is
// unknown, a shape is invalid, or a tensor's byte count does not match its
// dtype and shape. The input slice is not modified.
func Encode(tensors []Tensor, metadata map[string]string) ([]byte, error) {
	order := make([]int, len(tensors))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return tensors[order[a]].Name < tensors[order[b]].Name })

	var header bytes.Buffer
	header.WriteByte('{')
	if len(metadata) > 0 {
		keys := make([]string, 0, len(metadata))
		for k, v := range metadata {
			if !utf8.ValidString(k) || !utf8.ValidString(v) {
				return nil, fmt.Errorf("safetensors: metadata key %q: key or value is not valid UTF-8", k)
			}
			keys = append(keys, k)
		}
		sort.Strings(keys)
		writeJSONString(&header, metadataKey)
		header.WriteString(":{")
		for i, k := range keys {
			if i > 0 {
				header.WriteByte(',')
			}
			writeJSONString(&header, k)
			header.WriteByte(':')
			writeJSONString(&header, metadata[k])
		}
		header.WriteByte('}')
	}

	total := 0
	for i, idx := range order {
		t := &tensors[idx]
		if i > 0 && t.Name == tensors[order[i-1]].Name {
			return nil, fmt.Errorf("safetensors: duplicate tensor name %q", t.Name)
		}
		if t.Name == metadataKey {
			return nil, fmt.Errorf("safetensors: tensor name %q is reserved", t.Name)
		}
		if !utf8.ValidString(t.Name) {
			return nil, fmt.Errorf("safetensors: tensor name %q is not valid UTF-8", t.Name)
		}
		want, err := byteSize(t.DType, t.Shape)
		if err != nil {
			return nil, fmt.Errorf("safetensors: tensor %q: %w", t.Name, err)
		}
		if len(t.Data) != want {
			return nil, fmt.Errorf("safetensors: tensor %q: has %d bytes of data, but %s%v needs %d",
				t.Name, len(t.Data), t.DType, t.Shape, want)
		}
		if total > math.MaxInt-want {
			return nil, errors.New("safetensors: total data size overflows")
		}
		if header.Len() > 1 {
			header.WriteByte(',')
		}
		writeJSONString(&header, t.Name)
		header.WriteString(`:{"dtype":`)
		writeJSONString(&header, string(t.DType))
		header.WriteString(`,"shape":[`)
		for j, d := range t.Shape {
			if j > 0 {
				header.WriteByte(',')
			}
			header.WriteString(strconv.Itoa(d))
		}
		fmt.Fprintf(&header, `],"data_offsets":[%d,%d]}`, total, total+want)
		total += want
	}
	header.WriteByte('}')
	for header.Len()%8 != 0 {
		header.WriteByte(' ')
	}
	if header.Len() > MaxHeaderSize {
		return nil, fmt.Errorf("safetensors: header of %d bytes exceeds the %d-byte limit", header.Len(), MaxHeaderSize)
	}
	if total > math.MaxInt-8-header.Len() {
		return nil, errors.New("safetensors: total size overflows")
	}

	out := make([]byte, 8, 8+header.Len()+total)
	binary.LittleEndian.PutUint64(out, uint64(header.Len()))
	out = append(out, header.Bytes()...)
	for _, idx := range order {
		out = append(out, tensors[idx].Data...)
	}
	return out, nil
}

// writeJSONString writes s (valid UTF-8) as a JSON string literal, without
// the HTML escaping of json.Marshal.
func writeJSONString(b *bytes.Buffer, s string) {
	enc := json.NewEncoder(b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)       // cannot fail for a string
	b.Truncate(b.Len() - 1) // drop the newline Encode appends
}

// Write encodes the tensors (see Encode) and writes them to path atomically:
// the bytes go to a temporary file in the same directory, which is fsynced
// and renamed over path, and the directory is then fsynced (best effort). On
// any error, including an encoding error, path is left untouched and no
// temporary file remains. The file gets mode 0644.
func Write(path string, tensors []Tensor, metadata map[string]string) (err error) {
	data, err := Encode(tensors, metadata)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, data); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	return nil
}
