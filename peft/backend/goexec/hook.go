// Package goexec replaces some executors of GoMLX's pure-Go backend ("simplego") with faster
// ones: matrix products (DotGeneral) through an outside matrix-multiply kernel such as a BLAS
// library's gemm (Install), and float32/float64 binary ops whose operands broadcast
// (InstallRowWise).
//
// GoMLX v0.25 has no hook for this: simplego's executors are an unexported table. This package
// is the one place in peft that touches simplego's internals. Its DotGeneral executor turns each
// product into a batch of row-major GEMMs (transposing an operand into scratch memory only when
// its axes are not already in a GEMM layout) and hands them to the installed Kernels; its
// broadcast executor walks the operands row by row instead of element by element. Whatever they
// do not cover (other dtypes, other shapes) runs on the stock executor.
//
// Safety: the internals read (field names, types and offsets of simplego's Node, Buffer and
// DotGeneral parameters, the buffer-pool method called) are those of exactly GoMLXVersion.
// Installing refuses, and changes nothing, on any other GoMLX version (read from the binary's
// build information) or when a field read has moved; Install then runs a self-check product
// through the hook and uninstalls itself if the result is wrong. $PEFT_GOEXEC=off (EnvDisable)
// makes both installs refuse, leaving GoMLX's stock executors.
//
// Upstream: the same idea fits GoMLX as an exported registration, e.g.
// simplego.RegisterDotGeneralKernel(dtype, func(batch, m, n, k, transA, transB, a, b, c)),
// with the normalisation in gemm.go next to the stock executors, and the row-wise broadcast loop
// in broadcast.go as the stock binary ops' broadcast path.
package goexec

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gopjrt/dtypes"
)

// GoMLXModule is the module whose internals this package reads.
const GoMLXModule = "github.com/gomlx/gomlx"

// GoMLXVersion is the one GoMLX version whose internals this package knows. It must equal the
// version in peft's go.mod (a test checks).
const GoMLXVersion = "v0.25.0"

// errFinalized is returned by an executor asked to run on a finalized backend.
var errFinalized = errors.New("goexec: the backend is finalized")

// ErrVersion is returned (wrapped) by Install when the binary's GoMLX is not GoMLXVersion.
var ErrVersion = errors.New("goexec: unsupported GoMLX version")

// Gemm computes C = op(A)·op(B) for row-major matrices: C is m×n (row stride ldc) and is
// overwritten; op(A) is m×k, stored as A (row stride lda) or, when transA, as its k×m
// transpose; likewise op(B) is k×n, stored as B or, when transB, as n×k.
type Gemm[T float32 | float64] func(transA, transB bool, m, n, k int, a []T, lda int, b []T, ldb int, c []T, ldc int)

// Kernels are the products the hook hands out. A nil entry leaves that dtype to the stock
// executor.
type Kernels struct {
	// Name says what runs the products, for messages (e.g. "OpenBLAS 0.3.21 Haswell").
	Name    string
	Float32 Gemm[float32]
	Float64 Gemm[float64]
	// Split, when above 1, splits each large product (at least SplitMinMACs multiply-adds)
	// into that many parts run on their own goroutines: for single-threaded kernels, so that a
	// product the rest of the graph waits for still uses every core. Kernels must then be safe
	// for concurrent calls.
	Split int
}

// SplitMinMACs is the size (batch·m·n·k) from which Kernels.Split applies: below it a
// goroutine's start costs more than the share of the product it takes.
const SplitMinMACs = 1 << 20

// nodeExecutor is simplego's executor signature (exec.go).
type nodeExecutor func(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error)

//go:linkname nodeExecutors github.com/gomlx/gomlx/backends/simplego.nodeExecutors
var nodeExecutors [backends.OpTypeLast]nodeExecutor

//go:linkname getBufferForShape github.com/gomlx/gomlx/backends/simplego.(*Backend).getBufferForShape
func getBufferForShape(b *simplego.Backend, shape shapes.Shape) *simplego.Buffer

// dotGeneralNodeData mirrors simplego's dotGeneralNodeData (goexec.go); checkParamsType
// compares the two field by field before the first use.
type dotGeneralNodeData struct {
	lhsContractingAxes, lhsBatchAxes                       []int
	rhsContractingAxes, rhsBatchAxes                       []int
	batchSize, lhsCrossSize, rhsCrossSize, contractingSize int
	lhsBlockedShape, rhsBlockedShape, outputBlockedShape   shapes.Shape
}

// Offsets of the simplego fields read through unsafe, found by reflection at Install.
var (
	nodeShapeOffset, nodeDataOffset     uintptr
	bufferShapeOffset, bufferFlatOffset uintptr
)

var (
	installMu sync.Mutex
	stock     nodeExecutor // the executor replaced, for the products the kernels do not cover
	active    atomic.Pointer[Kernels]
	// paramsType is the dynamic type of simplego's DotGeneral node data, once checked.
	paramsType atomic.Pointer[reflect.Type]

	hooked, fallbacks, transposed, macs atomic.Int64
)

// Install makes the pure-Go backend run its float32/float64 DotGeneral products through k, for
// the whole process (GoMLX's executor table is global). Call it before the first graph
// executes: it writes the table unguarded, as simplego's own init functions do. Installing
// again replaces the kernels.
//
// It returns an error and changes nothing if the binary's GoMLX is not GoMLXVersion or its
// internals do not look as expected, and uninstalls itself if a self-check product through
// the hook comes out wrong.
func Install(k Kernels) error {
	if k.Float32 == nil && k.Float64 == nil {
		return errors.New("goexec: Install without kernels")
	}
	installMu.Lock()
	defer installMu.Unlock()
	if err := prepare(); err != nil {
		return err
	}
	if err := installDotGeneral(); err != nil {
		return err
	}
	kc := k
	active.Store(&kc)
	if err := selfCheck(); err != nil {
		active.Store(nil)
		return fmt.Errorf("goexec: %s failed the self-check, products stay on pure Go: %w", k.Name, err)
	}
	return nil
}

// installDotGeneral puts execDotGeneral in simplego's table, once; without kernels it passes
// products to the stock executor (and counts them). installMu must be held.
func installDotGeneral() error {
	if stock != nil {
		return nil
	}
	stock = nodeExecutors[backends.OpTypeDotGeneral]
	if stock == nil {
		return errors.New("goexec: simplego has no DotGeneral executor to replace")
	}
	nodeExecutors[backends.OpTypeDotGeneral] = execDotGeneral
	return nil
}

// Uninstall returns every product to the stock executor (the table entry stays ours and passes
// products through).
func Uninstall() { active.Store(nil) }

// Installed returns the kernels in use, or nil.
func Installed() *Kernels { return active.Load() }

// Stats counts DotGeneral executions since the process started, once Install or InstallRowWise
// has put this package's executor in place: those run by the kernels (Hooked), those passed to
// the stock executor (Fallbacks: no kernels installed, or another dtype), those of the first
// kind that needed an operand transposed into scratch memory first (Transposed), and the
// multiply-adds of all of them (MACs: batch·m·n·k each), from which benchmarks report GFLOP/s.
type Stats struct{ Hooked, Fallbacks, Transposed, MACs int64 }

// Counts returns the Stats so far.
func Counts() Stats {
	return Stats{Hooked: hooked.Load(), Fallbacks: fallbacks.Load(), Transposed: transposed.Load(), MACs: macs.Load()}
}

// EnvDisable, set to "off", keeps GoMLX's stock executors: Install and InstallRowWise refuse.
const EnvDisable = "PEFT_GOEXEC"

// ErrDisabled is returned by the installs when $PEFT_GOEXEC is "off".
var ErrDisabled = errors.New("goexec: disabled by " + EnvDisable + "=off")

var (
	prepareOnce sync.Once
	prepareErr  error
)

// prepare checks, once, that the internals this package reads are where it expects them.
func prepare() error {
	if strings.EqualFold(strings.TrimSpace(os.Getenv(EnvDisable)), "off") {
		return ErrDisabled
	}
	prepareOnce.Do(func() {
		if prepareErr = checkVersion(); prepareErr == nil {
			prepareErr = findOffsets()
		}
	})
	return prepareErr
}

// checkVersion reads GoMLX's version from the build information or, where that lists no
// dependencies (test binaries), from the source path compiled into simplego's code, which
// carries the module version ("…/github.com/gomlx/gomlx@v0.25.0/backends/simplego/…", with or
// without -trimpath).
func checkVersion() error {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path != GoMLXModule {
				continue
			}
			if dep.Replace != nil {
				return fmt.Errorf("%w: %s is replaced by %s %s; this hook knows %s only", ErrVersion, GoMLXModule, dep.Replace.Path, dep.Replace.Version, GoMLXVersion)
			}
			if dep.Version != GoMLXVersion {
				return fmt.Errorf("%w: %s %s; this hook knows %s only", ErrVersion, GoMLXModule, dep.Version, GoMLXVersion)
			}
			return nil
		}
	}
	file, _ := runtime.FuncForPC(reflect.ValueOf(simplego.New).Pointer()).FileLine(0)
	return versionFromPath(file)
}

// versionFromPath checks the GoMLX version in a source file path of simplego.
func versionFromPath(file string) error {
	const marker = GoMLXModule + "@"
	i := strings.LastIndex(file, marker)
	if i < 0 {
		return fmt.Errorf("%w: simplego is compiled from %s, not from a versioned module; this hook knows %s only", ErrVersion, file, GoMLXVersion)
	}
	version, _, _ := strings.Cut(file[i+len(marker):], "/")
	if version != GoMLXVersion {
		return fmt.Errorf("%w: %s %s; this hook knows %s only", ErrVersion, GoMLXModule, version, GoMLXVersion)
	}
	return nil
}

// findOffsets locates the simplego fields this package reads and checks their types.
func findOffsets() error {
	shapeType := reflect.TypeOf(shapes.Shape{})
	anyType := reflect.TypeOf((*any)(nil)).Elem()
	field := func(t reflect.Type, name string, want reflect.Type) (uintptr, error) {
		f, ok := t.FieldByName(name)
		if !ok || f.Type != want {
			return 0, fmt.Errorf("goexec: simplego.%s.%s is not a %s as in GoMLX %s", t.Name(), name, want, GoMLXVersion)
		}
		return f.Offset, nil
	}
	node, buffer := reflect.TypeOf(simplego.Node{}), reflect.TypeOf(simplego.Buffer{})
	var err error
	for _, f := range []struct {
		t      reflect.Type
		name   string
		want   reflect.Type
		offset *uintptr
	}{
		{node, "shape", shapeType, &nodeShapeOffset},
		{node, "data", anyType, &nodeDataOffset},
		{buffer, "shape", shapeType, &bufferShapeOffset},
		{buffer, "flat", anyType, &bufferFlatOffset},
	} {
		if *f.offset, err = field(f.t, f.name, f.want); err != nil {
			return err
		}
	}
	return nil
}

// checkParamsType compares simplego's DotGeneral node data type with our mirror.
func checkParamsType(t reflect.Type) error {
	mirror := reflect.TypeOf(dotGeneralNodeData{})
	if t.Kind() != reflect.Pointer || t.Elem().Kind() != reflect.Struct || t.Elem().Name() != mirror.Name() {
		return fmt.Errorf("goexec: DotGeneral node data is a %s, not *simplego.%s", t, mirror.Name())
	}
	s := t.Elem()
	if s.NumField() != mirror.NumField() || s.Size() != mirror.Size() {
		return fmt.Errorf("goexec: simplego.%s has %d fields (%d bytes), the mirror %d (%d bytes)", mirror.Name(), s.NumField(), s.Size(), mirror.NumField(), mirror.Size())
	}
	for i := range s.NumField() {
		a, b := s.Field(i), mirror.Field(i)
		if a.Name != b.Name || a.Type != b.Type || a.Offset != b.Offset {
			return fmt.Errorf("goexec: simplego.%s field %d is %s %s at %d, the mirror's %s %s at %d", mirror.Name(), i, a.Name, a.Type, a.Offset, b.Name, b.Type, b.Offset)
		}
	}
	return nil
}

func nodeShape(n *simplego.Node) shapes.Shape {
	return *(*shapes.Shape)(unsafe.Add(unsafe.Pointer(n), nodeShapeOffset))
}

func nodeData(n *simplego.Node) any { return *(*any)(unsafe.Add(unsafe.Pointer(n), nodeDataOffset)) }

func bufferShape(b *simplego.Buffer) shapes.Shape {
	return *(*shapes.Shape)(unsafe.Add(unsafe.Pointer(b), bufferShapeOffset))
}

func bufferFlat(b *simplego.Buffer) any {
	return *(*any)(unsafe.Add(unsafe.Pointer(b), bufferFlatOffset))
}

// params returns the node's DotGeneral parameters through the mirror, checking simplego's type
// once; nil if it does not match (the product then runs on the stock executor).
func params(node *simplego.Node) *dotGeneralNodeData {
	data := nodeData(node)
	t := reflect.TypeOf(data)
	if known := paramsType.Load(); known == nil || *known != t {
		if t == nil || checkParamsType(t) != nil {
			return nil
		}
		paramsType.Store(&t)
	}
	// An interface holding a pointer stores the pointer itself as its data word.
	return (*dotGeneralNodeData)((*[2]unsafe.Pointer)(unsafe.Pointer(&data))[1])
}

// execDotGeneral replaces simplego's DotGeneral executor.
func execDotGeneral(backend *simplego.Backend, node *simplego.Node, inputs []*simplego.Buffer, inputsOwned []bool) (*simplego.Buffer, error) {
	p := params(node)
	if p != nil {
		macs.Add(int64(p.batchSize) * int64(p.lhsCrossSize) * int64(p.rhsCrossSize) * int64(p.contractingSize))
	}
	k := active.Load()
	if k == nil {
		fallbacks.Add(1)
		return stock(backend, node, inputs, inputsOwned)
	}
	shape := nodeShape(node)
	var run func(out *simplego.Buffer) bool
	switch {
	case p == nil:
	case shape.DType == dtypes.Float32 && k.Float32 != nil:
		run = func(out *simplego.Buffer) bool {
			return product(k.Float32, k.Split, p, bufferShape(inputs[0]).Dimensions, bufferFlat(inputs[0]).([]float32),
				bufferShape(inputs[1]).Dimensions, bufferFlat(inputs[1]).([]float32), bufferFlat(out).([]float32))
		}
	case shape.DType == dtypes.Float64 && k.Float64 != nil:
		run = func(out *simplego.Buffer) bool {
			return product(k.Float64, k.Split, p, bufferShape(inputs[0]).Dimensions, bufferFlat(inputs[0]).([]float64),
				bufferShape(inputs[1]).Dimensions, bufferFlat(inputs[1]).([]float64), bufferFlat(out).([]float64))
		}
	}
	if run == nil {
		fallbacks.Add(1)
		return stock(backend, node, inputs, inputsOwned)
	}
	out := getBufferForShape(backend, shape)
	if out == nil {
		return nil, errFinalized
	}
	if run(out) {
		transposed.Add(1)
	}
	hooked.Add(1)
	return out, nil
}
