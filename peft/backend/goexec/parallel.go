package goexec

import (
	"errors"
	"fmt"
	"reflect"
	"unsafe"

	"github.com/gomlx/gomlx/backends/simplego"
)

// ErrRaceDetector is RunOpsInParallel's refusal in builds with the race detector.
var ErrRaceDetector = errors.New("goexec: ops stay sequential under the race detector (GoMLX v0.25's parallel executor reads its bookkeeping without its lock)")

// RunOpsInParallel makes backend run a graph's independent ops concurrently, without the
// deadlock of GoMLX v0.25's default pure-Go configuration.
//
// Why the default deadlocks: simplego schedules ops on a worker pool of 2×NumCPU slots, and an
// op running in a slot (a stock DotGeneral splitting its batch, a large Erf) waits for more
// slots; a graph with several independent matmuls fills every slot with ops that wait for each
// other. With an unlimited pool simplego starts every task on its own goroutine at once and never
// waits for a slot (the Go scheduler still runs them on GOMAXPROCS threads), so every wait is on
// work that has already started: no deadlock is possible, whatever the ops. GoMLX's own way to
// ask for that, the "parallelism=-1" option, also prints a line to stdout, which would corrupt
// programs whose stdout is data; this sets the same two fields directly.
//
// Ops then run in GoMLX's "dynamic" mode: in parallel while one graph executes at a time,
// sequentially when several execute at once. Call it right after creating the backend, before
// anything executes on it.
//
// Under the race detector it refuses (ErrRaceDetector), so ops stay sequential: simplego's
// parallel executor reads its buffer-ownership counts without the lock that guards their
// writes (exec.go's executeNode in GoMLX v0.25), which -race reports in every graph; sequential,
// -race checks everything else.
func RunOpsInParallel(backend *simplego.Backend) error {
	if err := prepare(); err != nil {
		return err
	}
	if RaceDetector {
		return ErrRaceDetector
	}
	bt := reflect.TypeOf(simplego.Backend{})
	workers, ok := bt.FieldByName("workers")
	if !ok || workers.Type.Kind() != reflect.Struct || workers.Type.Name() != "workersPool" {
		return fmt.Errorf("goexec: simplego.Backend has no workersPool field \"workers\" as in GoMLX %s", GoMLXVersion)
	}
	maxPar, ok := workers.Type.FieldByName("maxParallelism")
	if !ok || maxPar.Type.Kind() != reflect.Int {
		return fmt.Errorf("goexec: simplego's workersPool has no int field \"maxParallelism\" as in GoMLX %s", GoMLXVersion)
	}
	mode, ok := bt.FieldByName("opsExecutionType")
	if !ok || mode.Type.Kind() != reflect.Int || mode.Type.Name() != "opsExecutionType" {
		return fmt.Errorf("goexec: simplego.Backend has no opsExecutionType field as in GoMLX %s", GoMLXVersion)
	}
	base := unsafe.Pointer(backend)
	*(*int)(unsafe.Add(base, workers.Offset+maxPar.Offset)) = -1 // unlimited: WaitToStart never waits
	*(*int)(unsafe.Add(base, mode.Offset)) = 0                   // opsExecutionDynamic
	return nil
}
