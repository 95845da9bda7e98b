// Package backend chooses the GoMLX backend once per process.
//
// GoMLX tensors belong to one backend instance, so the whole program must share
// one: Get creates it on the first call and returns the same instance afterwards.
//
// Selection rules, in order:
//
//  1. If $GOMLX_BACKEND is set (and not blank) it is honoured, with one
//     exception: a pure-Go configuration ("go", "go:", "go:parallelism=4", …)
//     that is not deadlock-safe is rewritten by appending "ops_sequential" (see
//     below). An unknown backend name is an error, never a panic, and an
//     explicitly requested backend that fails to start is an error too (no
//     silent fallback).
//  2. Otherwise, if a PJRT plugin file is installed in one of the places gopjrt
//     searches, the XLA backend is used ("xla:cuda" is preferred over
//     "xla:cpu"). If it cannot be created, Get tries the next plugin and finally
//     falls back to pure Go, and Description says why.
//  3. Otherwise the pure-Go backend, created as "go:ops_sequential" and then,
//     through peft/backend/goexec, switched to run independent ops in parallel on
//     an unlimited worker pool (which cannot deadlock, see below); where goexec is
//     unavailable (another GoMLX version, $PEFT_GOEXEC=off) it stays sequential.
//
// Pure-Go speed: on the pure-Go backend (whether chosen automatically or through
// $GOMLX_BACKEND) Get also installs goexec's faster executors: matrix products
// through a BLAS library found at run time (peft/blas: OpenBLAS, or $PEFT_BLAS;
// "PEFT_BLAS=off" keeps GoMLX's kernels) and broadcast binary ops and reductions
// row by row. Without a BLAS library Description says how to install one.
//
// Why not GoMLX's default "go" configuration: GoMLX v0.25's pure-Go ("simplego")
// executor runs independent ops of a graph in a worker pool of 2×NumCPU slots,
// and its matmul (DotGeneral) splits its batch into tasks that wait for free
// slots while the matmul itself holds one. A graph with several independent
// matmuls (a LoRA model with a few targets) can fill every slot with matmuls that
// all wait for each other: a deadlock. With "ops_sequential" the ops run one after
// another on the calling goroutine (which holds no slot), so the matmul tasks
// always complete; "parallelism=0" is safe as well (every task runs inline) and
// so is an unlimited pool ("parallelism=-1": no task ever waits for a slot). This
// package never hands out the default configuration, and rewrites a
// $GOMLX_BACKEND that asks for it.
//
// Build notes: the package imports github.com/gomlx/gomlx/backends/default,
// which registers the pure-Go backend ("go") and, on linux/amd64 and darwin
// unless built with -tags noxla, the XLA/StableHLO backend ("xla", "stablehlo",
// "hlo", "shlo") through gopjrt. The XLA backend needs cgo and a C compiler at
// build time (no C library: plugins are loaded with dlopen at run time). With
// CGO_ENABLED=0 only the pure-Go backend is compiled in (see default_*.go), and
// Choose never proposes XLA then.
//
// Output: Get itself prints nothing; callers print Description(). GoMLX and
// gopjrt may still log on their own (simplego prints a line when a
// "parallelism=N" option is given in $GOMLX_BACKEND; gopjrt logs through klog
// when it probes plugins).
package backend

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"

	"peft/peft/backend/goexec"
	"peft/peft/blas"
)

const (
	// EnvConfig is the environment variable that overrides the automatic choice
	// (the same one GoMLX itself reads): "<backend>[:<options>]".
	EnvConfig = backends.ConfigEnvVar

	// EnvPluginPath is the environment variable gopjrt reads to find PJRT
	// plugins: a ":"-separated list of directories. When set, the default
	// directories are not searched.
	EnvPluginPath = "PJRT_PLUGIN_LIBRARY_PATH"

	// SafeGoConfig is the pure-Go configuration used when no PJRT plugin is
	// available: ops executed sequentially, which cannot deadlock.
	SafeGoConfig = goBackendName + ":" + optOpsSequential

	goBackendName    = "go"  // simplego.BackendName
	xlaBackendName   = "xla" // registered by backends/stablehlo
	optOpsSequential = "ops_sequential"
	optOpsParallel   = "ops_parallel"
	optParallelism   = "parallelism"
)

// candidate is one configuration Get may try, with the human reason for it.
type candidate struct {
	config string
	reason string
	// explicit marks a configuration requested through $GOMLX_BACKEND: a
	// failure is returned as an error instead of falling back.
	explicit bool
	// pureGoFallback marks the final pure-Go candidate of the automatic path.
	pureGoFallback bool
}

var (
	mu          sync.Mutex
	current     backends.Backend
	description string
)

// Get returns the process-wide backend, creating it on first call; later calls
// return the same one (tensors belong to one backend instance).
//
// A failed call caches nothing, so a later call tries again. Get is safe for
// concurrent use and prints nothing; see Description for what was chosen.
func Get() (backends.Backend, error) {
	mu.Lock()
	defer mu.Unlock()
	if current != nil {
		return current, nil
	}
	b, desc, err := create(plan())
	if err != nil {
		return nil, err
	}
	current, description = b, desc
	return current, nil
}

// Description returns one human line saying which backend runs and why, e.g.
//
//	backend: go, ops in parallel (pure Go; no PJRT plugin found — install one to use XLA); matmuls: OpenBLAS 0.3.21 … Haswell …, 1 thread
//	backend: xla:cpu (PJRT plugin /usr/local/lib/gomlx/pjrt/pjrt_c_api_cpu_plugin.so)
//	backend: go:ops_sequential (from GOMLX_BACKEND); matmuls: pure Go, blas: no BLAS library found (…); install OpenBLAS …
//
// It is valid after Get succeeded and returns "" before.
func Description() string {
	mu.Lock()
	defer mu.Unlock()
	return description
}

// Choose returns the configuration string that Get tries first and the reason
// for it, without creating anything. It is a pure function of the environment,
// the file system and the backends compiled into the binary.
//
// When the choice is a PJRT plugin that then fails to load, Get falls back to
// the next plugin and finally to SafeGoConfig (Description tells); an explicit
// $GOMLX_BACKEND never falls back.
func Choose() (config, reason string) {
	c := plan()[0]
	return c.config, c.reason
}

// plan lists the configurations Get tries, in order. It is never empty.
func plan() []candidate {
	if v, ok := os.LookupEnv(EnvConfig); ok && strings.TrimSpace(v) != "" {
		return []candidate{fromEnv(strings.TrimSpace(v))}
	}

	var cands []candidate
	plugins := findPlugins()
	if len(plugins) > 0 && !slices.Contains(backends.List(), xlaBackendName) {
		return []candidate{{
			config: SafeGoConfig,
			reason: fmt.Sprintf("pure Go; PJRT plugin %s found, but this binary has no XLA backend "+
				"(built with CGO_ENABLED=0 or -tags noxla)", plugins[0].path),
			pureGoFallback: true,
		}}
	}
	for _, p := range plugins {
		cands = append(cands, candidate{
			config: xlaBackendName + ":" + p.name,
			reason: "PJRT plugin " + p.path,
		})
	}
	return append(cands, candidate{
		config:         SafeGoConfig,
		reason:         "pure Go; no PJRT plugin found — install one to use XLA",
		pureGoFallback: true,
	})
}

// fromEnv turns a $GOMLX_BACKEND value into a candidate, making a pure-Go
// configuration deadlock-safe.
func fromEnv(v string) candidate {
	name, opts := splitConfig(v)
	if name != goBackendName {
		return candidate{config: v, reason: "from " + EnvConfig, explicit: true}
	}
	safe, fixed := safeGoConfig(opts)
	if safe {
		return candidate{config: v, reason: "from " + EnvConfig, explicit: true}
	}
	return candidate{
		config: fixed,
		reason: fmt.Sprintf("from %s=%q, with %s added: GoMLX's default pure-Go op scheduler "+
			"can deadlock on graphs with several independent matmuls", EnvConfig, v, optOpsSequential),
		explicit: true,
	}
}

// safeGoConfig reports whether the simplego options opts are deadlock-safe
// (the effective ops mode is sequential, or the effective parallelism is 0 or
// unlimited (negative);
// simplego applies options left to right, so the last one of a kind wins) and
// returns a safe configuration ("go:" + options) otherwise.
func safeGoConfig(opts string) (safe bool, fixed string) {
	sequential, zeroParallelism := false, false
	var kept []string
	for _, part := range strings.Split(opts, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		kept = append(kept, part)
		key, value, _ := strings.Cut(part, "=")
		switch key {
		case optOpsSequential:
			sequential = true
		case optOpsParallel:
			sequential = false
		case optParallelism:
			n, err := strconv.Atoi(value)
			zeroParallelism = err == nil && n <= 0
		}
	}
	if sequential || zeroParallelism {
		return true, ""
	}
	return false, goBackendName + ":" + strings.Join(append(kept, optOpsSequential), ",")
}

// splitConfig splits "<backend>:<options>" like backends.NewWithConfig does.
func splitConfig(config string) (name, options string) {
	name, options, _ = strings.Cut(config, ":")
	return name, options
}

// create tries the candidates in order and returns the first backend that
// starts, with its description.
func create(cands []candidate) (backends.Backend, string, error) {
	var failures []string
	for _, c := range cands {
		b, err := newWithConfig(c.config)
		if err != nil {
			if c.explicit {
				return nil, "", fmt.Errorf("backend: %s=%q: %w", EnvConfig, c.config, err)
			}
			failures = append(failures, fmt.Sprintf("%s failed: %v", c.config, err))
			continue
		}
		reason := c.reason
		if len(failures) > 0 {
			if c.pureGoFallback {
				reason = "pure Go; " + strings.Join(failures, "; ")
			} else {
				reason += "; " + strings.Join(failures, "; ")
			}
		}
		config, parallel := c.config, false
		if sg, ok := b.(*simplego.Backend); ok && c.pureGoFallback {
			if err := goexec.RunOpsInParallel(sg); err == nil {
				config, parallel = goBackendName+", ops in parallel", true
			}
		}
		desc := fmt.Sprintf("backend: %s (%s)", config, reason)
		if name, _ := splitConfig(c.config); name == goBackendName {
			desc += "; matmuls: " + installExecutors(parallel)
		}
		return b, desc, nil
	}
	return nil, "", fmt.Errorf("backend: no backend could be created: %s", strings.Join(failures, "; "))
}

// installExecutors speeds up the pure-Go backend (see peft/backend/goexec): broadcast binary
// ops and reductions row by row, and matrix products through a BLAS library when one is found
// (peft/blas). With ops in parallel each BLAS call runs on one thread (unless
// $OPENBLAS_NUM_THREADS says otherwise: two BLAS threads next to a concurrent op busy-wait a
// core, and measured slower) and large products are split over the cores instead. It returns
// what runs the matrix products, for Description.
func installExecutors(opsInParallel bool) string {
	if err := goexec.InstallRowWise(); err != nil {
		return "pure Go, " + err.Error()
	}
	lib, err := blas.Load()
	switch {
	case errors.Is(err, blas.ErrDisabled):
		return "pure Go (" + blas.EnvLibrary + "=off)"
	case err != nil:
		return "pure Go, " + err.Error()
	}
	if _, set := os.LookupEnv("OPENBLAS_NUM_THREADS"); opsInParallel && !set {
		lib.SetThreads(1)
	}
	k := goexec.Kernels{Name: lib.Version, Float32: lib.Sgemm, Float64: lib.Dgemm}
	threads := lib.Threads()
	if threads == 1 {
		// One BLAS thread per call: split large products over the cores ourselves, so that a
		// product the rest of the graph waits for (most of a forward pass) still uses them all.
		k.Split = runtime.GOMAXPROCS(0)
	}
	if err := goexec.Install(k); err != nil {
		return "pure Go, " + err.Error()
	}
	switch {
	case threads == 0:
		return lib.Version
	case k.Split > 1:
		return fmt.Sprintf("%s, 1 thread a call, large products split in %d", lib.Version, k.Split)
	default:
		return fmt.Sprintf("%s, %d threads", lib.Version, threads)
	}
}

// newWithConfig is backends.NewWithConfig made safe: an unknown backend name is
// an error and any panic of a constructor is turned into an error.
func newWithConfig(config string) (b backends.Backend, err error) {
	name, _ := splitConfig(config)
	available := backends.List()
	sort.Strings(available)
	if !slices.Contains(available, name) {
		return nil, fmt.Errorf("unknown backend %q (compiled in: %s)", name, strings.Join(available, ", "))
	}
	defer func() {
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("creating backend %q panicked: %v", config, r)
		}
	}()
	b, err = backends.NewWithConfig(config)
	if err == nil && b == nil {
		err = errors.New("backend constructor returned nil")
	}
	if err != nil {
		return nil, err
	}
	return b, nil
}

// plugin is a PJRT plugin file found on disk.
type plugin struct {
	name string // "cuda", "cpu", …
	path string
}

// Plugin file names, as gopjrt recognises them (pjrt/dynamiclib_base.go).
var (
	pluginGlobs   = []string{"pjrt-plugin-*.so", "pjrt_plugin_*.so", "pjrt_c_api_*_plugin.so"}
	rePluginNames = []*regexp.Regexp{
		regexp.MustCompile(`^pjrt_c_api_(\w+)_plugin\.so$`),
		regexp.MustCompile(`^pjrt[-_]plugin[-_](\w+)\.so$`),
	}
	// preferredPlugins come first, in this order; others follow by name.
	preferredPlugins = []string{"cuda", "cpu"}
)

// findPlugins lists the PJRT plugins installed in the directories gopjrt
// searches, one per name (the first directory wins), cuda first, then cpu,
// then the others sorted by name.
func findPlugins() []plugin {
	byName := map[string]string{}
	for _, dir := range pluginSearchDirs() {
		for _, pattern := range pluginGlobs {
			matches, err := filepath.Glob(filepath.Join(dir, pattern))
			if err != nil {
				continue
			}
			sort.Strings(matches)
			for _, m := range matches {
				name := pluginName(filepath.Base(m))
				if name == "" {
					continue
				}
				if _, seen := byName[name]; seen {
					continue
				}
				if info, err := os.Stat(m); err != nil || !info.Mode().IsRegular() {
					continue
				}
				byName[name] = m
			}
		}
	}
	var out []plugin
	for _, name := range preferredPlugins {
		if p, ok := byName[name]; ok {
			out = append(out, plugin{name, p})
			delete(byName, name)
		}
	}
	var rest []string
	for name := range byName {
		rest = append(rest, name)
	}
	sort.Strings(rest)
	for _, name := range rest {
		out = append(out, plugin{name, byName[name]})
	}
	return out
}

func pluginName(base string) string {
	for _, re := range rePluginNames {
		if m := re.FindStringSubmatch(base); m != nil {
			return m[1]
		}
	}
	return ""
}

// pluginSearchDirs returns the directories gopjrt searches for plugins:
// $PJRT_PLUGIN_LIBRARY_PATH if set; otherwise ~/.local/lib/gomlx/pjrt,
// /usr/local/lib/gomlx/pjrt, the absolute entries of $LD_LIBRARY_PATH and the
// directories listed in /etc/ld.so.conf (following its includes).
func pluginSearchDirs() []string {
	if v, ok := os.LookupEnv(EnvPluginPath); ok {
		var dirs []string
		for _, d := range strings.Split(v, ":") {
			if d != "" {
				dirs = append(dirs, d)
			}
		}
		return dirs
	}
	var dirs []string
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(home, ".local", "lib", "gomlx", "pjrt"))
	}
	dirs = append(dirs, "/usr/local/lib/gomlx/pjrt")
	for _, d := range strings.Split(os.Getenv("LD_LIBRARY_PATH"), ":") {
		if d != "" && filepath.IsAbs(d) {
			dirs = append(dirs, d)
		}
	}
	return ldSoConfDirs(dirs, "/etc/ld.so.conf", 0)
}

// ldSoConfDirs appends the directories listed in an ld.so.conf-style file,
// following "include" globs (relative ones from the including file's
// directory), up to a small nesting depth so include cycles terminate.
func ldSoConfDirs(dirs []string, file string, depth int) []string {
	if depth > 8 {
		return dirs
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return dirs
	}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = strings.TrimSpace(line[:i])
		}
		if line == "" {
			continue
		}
		if rest, ok := strings.CutPrefix(line, "include"); ok && (rest == "" || rest[0] == ' ' || rest[0] == '\t') {
			pattern := strings.TrimSpace(rest)
			if pattern == "" {
				continue
			}
			if !filepath.IsAbs(pattern) {
				pattern = filepath.Join(filepath.Dir(file), pattern)
			}
			matches, _ := filepath.Glob(pattern)
			sort.Strings(matches)
			for _, m := range matches {
				dirs = ldSoConfDirs(dirs, m, depth+1)
			}
			continue
		}
		dirs = append(dirs, line)
	}
	return dirs
}
