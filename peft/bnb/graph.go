package bnb

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gopjrt/dtypes"
)

// Nodes are the graph values of a quantized tensor's stored parts, as DequantizeGraph reads them
// (typically the values of frozen variables holding a Quantized's fields).
type Nodes struct {
	// Packed is uint8 [(n+1)/2]: Quantized.Packed.
	Packed *graph.Node
	// Absmax is float32 [blocks] (Quantized.Absmax) without double quantization, uint8 [blocks]
	// (Nested.Codes) with it.
	Absmax *graph.Node
	// NestedAbsmax is float32 [⌈blocks/nested block size⌉] (Nested.Absmax); double quantization
	// only.
	NestedAbsmax *graph.Node
	// Offset is a float32 scalar (Nested.Offset); double quantization only.
	Offset *graph.Node
}

// Layout is what DequantizeGraph needs to know about a quantized tensor besides its stored parts:
// the code tables are graph constants, not data.
type Layout struct {
	Type      QuantType
	BlockSize int
	// N is the number of values.
	N int
	// NestedBlockSize and NestedMap describe double quantization (NestedBlockSize 0: none).
	NestedBlockSize int
	NestedMap       [256]float32
}

// Layout returns the layout of q.
func (q *Quantized) Layout() Layout {
	l := Layout{Type: q.Type, BlockSize: q.BlockSize, N: q.Len()}
	if q.Nested != nil {
		l.NestedBlockSize, l.NestedMap = q.Nested.BlockSize, q.Nested.Map
	}
	return l
}

// DequantizeGraph builds the dequantization of a tensor inside a graph and returns its n values,
// float32 [n], row-major in PyTorch order. It computes exactly what Quantized.Dequantize computes
// on the host (the same float32 multiplications and additions, in the same order), so the two
// agree bit for bit on backends that round every float32 operation (the pure-Go backend does).
//
// It uses only ops the pure-Go backend supports, and no shifts or bitcasts: each packed byte is
// looked up in a constant table [256, 2] holding the codes of its high and low nibble (one
// Gather), the pairs are flattened, and each block is multiplied by its scale (a reshape when the
// block size divides n, a Gather of the block index otherwise). With double quantization the
// scales are first restored as float32(map[code]·nestedAbsmax) + offset.
func DequantizeGraph(l Layout, nodes Nodes) *graph.Node {
	code, err := Code(l.Type)
	if err != nil {
		panic(err)
	}
	g := nodes.Packed.Graph()
	pairs := make([][]float32, 256)
	for b := range pairs {
		pairs[b] = []float32{code[b>>4], code[b&0x0F]}
	}
	packed := graph.ConvertDType(nodes.Packed, dtypes.Int32)
	values := graph.Gather(graph.Const(g, pairs), graph.ExpandAxes(packed, -1)) // [(n+1)/2, 2]
	values = graph.Reshape(values, -1)
	if values.Shape().Dim(0) != l.N {
		values = graph.Slice(values, graph.AxisRange(0, l.N)) // odd n: drop the padding nibble
	}
	scales := nodes.Absmax
	if l.NestedBlockSize > 0 {
		m := l.NestedMap
		centred := graph.Gather(graph.Const(g, m[:]), graph.ExpandAxes(graph.ConvertDType(nodes.Absmax, dtypes.Int32), -1))
		scales = graph.Add(perBlock(centred, nodes.NestedAbsmax, l.NestedBlockSize),
			graph.BroadcastToDims(graph.Reshape(nodes.Offset), centred.Shape().Dimensions...))
	}
	if scales.DType() != dtypes.Float32 {
		panic(fmt.Sprintf("bnb.DequantizeGraph: float32 absmax expected without double quantization, got %s", scales.Shape()))
	}
	return perBlock(values, scales, l.BlockSize)
}

// perBlock multiplies each group of blockSize consecutive values (the last may be shorter) by
// its scale: values [n], scales [⌈n/blockSize⌉] → [n].
func perBlock(values, scales *graph.Node, blockSize int) *graph.Node {
	n := values.Shape().Dim(0)
	blocks := scales.Shape().Dim(0)
	if n%blockSize == 0 {
		v := graph.Reshape(values, blocks, blockSize)
		s := graph.BroadcastToDims(graph.Reshape(scales, blocks, 1), blocks, blockSize)
		return graph.Reshape(graph.Mul(v, s), n)
	}
	index := graph.DivScalar(graph.Iota(values.Graph(), shapes.Make(dtypes.Int32, n), 0), blockSize)
	return graph.Mul(values, graph.Gather(scales, graph.ExpandAxes(index, -1)))
}
