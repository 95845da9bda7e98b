package goexec

import (
	"testing"
	"time"

	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gopjrt/dtypes"
)

// TestParallelOpsDoNotDeadlock runs, with the stock matmul kernels, the graph that deadlocks
// GoMLX v0.25's default pure-Go configuration within a few runs (twelve independent matmuls
// large enough to split their batch over the worker pool), fifty times on a backend set up by
// RunOpsInParallel, and checks the value against sequential execution.
func TestParallelOpsDoNotDeadlock(t *testing.T) {
	Uninstall() // the stock DotGeneral is the one that waits for workers
	b, err := simplego.New("ops_sequential")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Finalize()
	if RaceDetector {
		if err := RunOpsInParallel(b.(*simplego.Backend)); err != ErrRaceDetector {
			t.Fatalf("under the race detector RunOpsInParallel must refuse, got %v", err)
		}
		t.Skip("ops stay sequential under the race detector")
	}
	if err := RunOpsInParallel(b.(*simplego.Backend)); err != nil {
		t.Fatal(err)
	}
	fn := func(x *graph.Node) *graph.Node {
		g := x.Graph()
		var sum *graph.Node
		for i := range 12 {
			w := graph.MulScalar(graph.IotaFull(g, shapes.Make(dtypes.Float32, 64, 64+i)), 1e-3)
			y := graph.ReduceAllSum(graph.Einsum("bsd,de->bse", x, w))
			if sum == nil {
				sum = y
			} else {
				sum = graph.Add(sum, y)
			}
		}
		return sum
	}
	input := func(g *graph.Graph) *graph.Node {
		return graph.MulScalar(graph.IotaFull(g, shapes.Make(dtypes.Float32, 8, 128, 64)), 1e-4)
	}
	x := graph.MustExecOnce(b, input)
	seq := newBackend(t)
	want := graph.MustExecOnce(seq, fn, graph.MustExecOnce(seq, input)).Value().(float32)

	exec := graph.MustNewExec(b, fn)
	done := make(chan float32)
	go func() {
		var v float32
		for range 50 {
			v = exec.MustExec(x)[0].Value().(float32)
		}
		done <- v
	}()
	select {
	case got := <-done:
		if got != want {
			t.Fatalf("parallel result %g, sequential %g", got, want)
		}
	case <-time.After(5 * time.Minute): // far beyond the second the runs take: a deadlock
		t.Fatal("the graph deadlocked with ops in parallel")
	}
}
