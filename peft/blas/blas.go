// Package blas finds a BLAS library at run time and calls its matrix products.
//
// The library is opened with dlopen through github.com/ebitengine/purego, so building needs no
// cgo, headers or BLAS package, and a machine without one still builds and runs: Load returns
// ErrNotFound, whose message says how to install one. Only the Fortran entry points sgemm_ and
// dgemm_ are used (every BLAS has them, and they take all arguments by pointer, so a call costs
// no reflection or allocation); OpenBLAS's thread controls and version string are used where the
// library has them.
//
// Search order: $PEFT_BLAS (a file path or a library name for dlopen; "off" disables
// BLAS), then OpenBLAS under its usual names. A generic "libblas.so.3" is not tried on purpose:
// it is often the reference BLAS, no faster than GoMLX's own kernels.
package blas

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// EnvLibrary names the BLAS library to load (a path or a dlopen name), or "off" to use none.
const EnvLibrary = "PEFT_BLAS"

// ErrNotFound is returned (wrapped) by Load when no BLAS library could be opened.
var ErrNotFound = errors.New("no BLAS library found")

// ErrDisabled is returned by Load when $PEFT_BLAS is "off".
var ErrDisabled = errors.New("BLAS disabled by " + EnvLibrary + "=off")

// InstallHint says how to get OpenBLAS on the common systems.
const InstallHint = "install OpenBLAS for fast CPU matrix products (Debian/Ubuntu: apt install libopenblas0-pthread; Fedora: dnf install openblas-threads; macOS: brew install openblas) or point " + EnvLibrary + " at a BLAS library"

// Library is an opened BLAS library. Its methods are safe for concurrent use.
type Library struct {
	// Path is what was passed to dlopen.
	Path string
	// Version describes the library: OpenBLAS's configuration string (version, kernel, threads
	// model) where available, otherwise Path.
	Version string

	sgemm, dgemm uintptr
	setThreads   uintptr // openblas_set_num_threads, or 0
	getThreads   uintptr // openblas_get_num_threads, or 0
}

var (
	loadOnce sync.Once
	loaded   *Library
	loadErr  error
)

// Load opens the BLAS library once per process and returns it; later calls return the same
// result. See the package comment for where it looks.
func Load() (*Library, error) {
	loadOnce.Do(func() { loaded, loadErr = load(os.Getenv(EnvLibrary)) })
	return loaded, loadErr
}

// defaultNames are the libraries tried, in order, when $PEFT_BLAS is unset.
var defaultNames = func() []string {
	if runtime.GOOS == "darwin" {
		return []string{
			"libopenblas.dylib",
			"/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
			"/usr/local/opt/openblas/lib/libopenblas.dylib",
			"/System/Library/Frameworks/Accelerate.framework/Accelerate",
		}
	}
	return []string{"libopenblas.so.0", "libopenblas.so"}
}()

func candidates(env string) []string {
	if env != "" {
		return []string{env}
	}
	return defaultNames
}

func load(env string) (*Library, error) {
	env = strings.TrimSpace(env)
	if strings.EqualFold(env, "off") {
		return nil, ErrDisabled
	}
	lib, err := open(candidates(env))
	switch {
	case err == nil:
		return lib, nil
	case env != "":
		return nil, fmt.Errorf("blas: %s=%q: %w", EnvLibrary, env, err)
	default:
		return nil, fmt.Errorf("blas: %w; %s", err, InstallHint)
	}
}

// open returns the first of names that opens as a BLAS library.
func open(names []string) (*Library, error) {
	var tried []string
	for _, name := range names {
		handle, err := purego.Dlopen(name, purego.RTLD_NOW|purego.RTLD_LOCAL)
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s: %v", name, err))
			continue
		}
		lib, err := bind(handle, name)
		if err != nil {
			_ = purego.Dlclose(handle)
			tried = append(tried, fmt.Sprintf("%s: %v", name, err))
			continue
		}
		return lib, nil
	}
	return nil, fmt.Errorf("%w (tried %s)", ErrNotFound, strings.Join(tried, "; "))
}

func bind(handle uintptr, name string) (*Library, error) {
	lib := &Library{Path: name, Version: name}
	var err error
	if lib.sgemm, err = purego.Dlsym(handle, "sgemm_"); err != nil {
		return nil, fmt.Errorf("no sgemm_: %w", err)
	}
	if lib.dgemm, err = purego.Dlsym(handle, "dgemm_"); err != nil {
		return nil, fmt.Errorf("no dgemm_: %w", err)
	}
	lib.setThreads, _ = purego.Dlsym(handle, "openblas_set_num_threads")
	lib.getThreads, _ = purego.Dlsym(handle, "openblas_get_num_threads")
	if cfg, err := purego.Dlsym(handle, "openblas_get_config"); err == nil {
		if r, _, _ := purego.SyscallN(cfg); r != 0 {
			lib.Version = strings.TrimSpace(goString(r, 256))
		}
	}
	return lib, nil
}

// goString copies a NUL-terminated C string of at most max bytes.
func goString(p uintptr, max int) string {
	// p is C memory, which the Go collector neither moves nor frees: reading it through a
	// pointer made from the integer is sound (the double cast keeps vet's uintptr check quiet).
	b := unsafe.Slice(*(**byte)(unsafe.Pointer(&p)), max)
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// SetThreads sets how many threads the library's products use (OpenBLAS only; other libraries
// ignore it). n ≤ 0 means one per CPU.
func (l *Library) SetThreads(n int) {
	if l.setThreads == 0 {
		return
	}
	if n <= 0 {
		n = runtime.NumCPU()
	}
	purego.SyscallN(l.setThreads, uintptr(n))
}

// Threads reports how many threads the library's products use (0 where it cannot tell).
func (l *Library) Threads() int {
	if l.getThreads == 0 {
		return 0
	}
	r, _, _ := purego.SyscallN(l.getThreads)
	return int(int32(r))
}

// Sgemm sets C = op(A)·op(B) for row-major float32 matrices: C is m×n with row stride ldc;
// op(A) is m×k, stored as A (m×k, row stride lda) or, when transA, as its transpose (k×m);
// likewise op(B) is k×n, stored as B (k×n) or, when transB, as n×k.
//
// The slices must hold the matrices their strides describe; Sgemm panics if one is too short,
// since the library would read or write past it.
func (l *Library) Sgemm(transA, transB bool, m, n, k int, a []float32, lda int, b []float32, ldb int, c []float32, ldc int) {
	checkGemm(transA, transB, m, n, k, len(a), lda, len(b), ldb, len(c), ldc)
	one, zero := float32(1), float32(0)
	gemm(l.sgemm, transA, transB, m, n, k, unsafe.Pointer(&one), unsafe.Pointer(&a[0]), lda,
		unsafe.Pointer(&b[0]), ldb, unsafe.Pointer(&zero), unsafe.Pointer(&c[0]), ldc)
	runtime.KeepAlive(a)
	runtime.KeepAlive(b)
	runtime.KeepAlive(c)
}

// Dgemm is Sgemm for float64.
func (l *Library) Dgemm(transA, transB bool, m, n, k int, a []float64, lda int, b []float64, ldb int, c []float64, ldc int) {
	checkGemm(transA, transB, m, n, k, len(a), lda, len(b), ldb, len(c), ldc)
	one, zero := float64(1), float64(0)
	gemm(l.dgemm, transA, transB, m, n, k, unsafe.Pointer(&one), unsafe.Pointer(&a[0]), lda,
		unsafe.Pointer(&b[0]), ldb, unsafe.Pointer(&zero), unsafe.Pointer(&c[0]), ldc)
	runtime.KeepAlive(a)
	runtime.KeepAlive(b)
	runtime.KeepAlive(c)
}

// checkGemm panics unless the slices hold the matrices and the sizes fit BLAS's 32-bit integers.
func checkGemm(transA, transB bool, m, n, k, lenA, lda, lenB, ldb, lenC, ldc int) {
	need := func(name string, trans bool, rows, cols, ld, length int) {
		if trans {
			rows, cols = cols, rows
		}
		if rows <= 0 || cols <= 0 || ld < cols || ld > 1<<31-1 || (rows-1)*ld+cols > length {
			panic(fmt.Sprintf("blas: matrix %s (%d×%d, row stride %d) does not fit its slice of %d values", name, rows, cols, ld, length))
		}
	}
	need("A", transA, m, k, lda, lenA)
	need("B", transB, k, n, ldb, lenB)
	need("C", false, m, n, ldc, lenC)
}

// gemm calls the Fortran (column-major) gemm for a row-major product: row-major C = op(A)·op(B)
// is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so the operands swap places and keep their flags.
func gemm(fn uintptr, transA, transB bool, m, n, k int, alpha, a unsafe.Pointer, lda int, b unsafe.Pointer, ldb int, beta, c unsafe.Pointer, ldc int) {
	flag := func(t bool) byte {
		if t {
			return 'T'
		}
		return 'N'
	}
	ta, tb := flag(transB), flag(transA)
	M, N, K := int32(n), int32(m), int32(k)
	LDA, LDB, LDC := int32(ldb), int32(lda), int32(ldc)
	purego.SyscallN(fn,
		uintptr(unsafe.Pointer(&ta)), uintptr(unsafe.Pointer(&tb)),
		uintptr(unsafe.Pointer(&M)), uintptr(unsafe.Pointer(&N)), uintptr(unsafe.Pointer(&K)),
		uintptr(alpha), uintptr(b), uintptr(unsafe.Pointer(&LDA)), uintptr(a), uintptr(unsafe.Pointer(&LDB)),
		uintptr(beta), uintptr(c), uintptr(unsafe.Pointer(&LDC)),
		1, 1) // the hidden lengths of the two character arguments, for BLAS built with gfortran
}
