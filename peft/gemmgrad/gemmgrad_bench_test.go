package gemmgrad

import (
	"math/rand/v2"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
)

// BenchmarkDenseGradient times one gradient step of a Dense-like einsum
// ("abc,cd->abd", [8,128,256] x [256,256]) on the go:ops_sequential backend,
// with GoMLX's stock matmul gradient rules and with the GEMM-form rules.
//
// Besides ns/op it reports graph-B (the summed byte size of every node output
// in the compiled graph, a proxy for the memory the step touches) and
// maxnode-B (the largest single node output: the stock rule's broadcast
// temporary is [1024,256,256] float32 = 256 MiB).
func BenchmarkDenseGradient(b *testing.B) {
	defer Disable()
	rng := rand.New(rand.NewPCG(1, 1))
	x := randomTensor(rng, []int{8, 128, 256})
	w := randomTensor(rng, []int{256, 256})
	cot := randomTensor(rng, []int{8, 128, 256})
	step := func(x, w, cot *graph.Node) (*graph.Node, *graph.Node) {
		out := graph.Einsum("abc,cd->abd", x, w)
		g := graph.Gradient(graph.ReduceAllSum(graph.Mul(out, cot)), x, w)
		return g[0], g[1]
	}
	for _, mode := range []struct {
		name string
		gemm bool
	}{{"stock", false}, {"gemm", true}} {
		b.Run(mode.name, func(b *testing.B) {
			if mode.gemm {
				Enable()
			} else {
				Disable()
			}
			exec := graph.MustNewExec(backend(b), step)
			defer exec.Finalize()
			// Compile (with the rules selected above) and warm up outside the timer.
			res, g := exec.MustExecWithGraph(x, w, cot)
			for _, t := range res {
				t.MustFinalizeAll()
			}
			var graphBytes, maxNode uintptr
			for _, n := range g.Nodes() {
				if n.NumOutputs() == 1 {
					m := n.Shape().Memory()
					graphBytes += m
					maxNode = max(maxNode, m)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				for _, t := range exec.MustExec(x, w, cot) {
					t.MustFinalizeAll()
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(graphBytes), "graph-B")
			b.ReportMetric(float64(maxNode), "maxnode-B")
		})
	}
}
