package backend

import (
	"os"
	"path/filepath"
	"peft/peft/backend/goexec"
	"slices"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/backends/simplego"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// resetForTest forgets the process-wide backend so a test can exercise Get
// from scratch; the previous state is restored when the test ends.
func resetForTest(t *testing.T) {
	t.Helper()
	mu.Lock()
	oldB, oldD := current, description
	current, description = nil, ""
	mu.Unlock()
	t.Cleanup(func() {
		mu.Lock()
		current, description = oldB, oldD
		mu.Unlock()
	})
}

// noPlugins points the plugin search at an empty directory so the result does
// not depend on what this machine has installed.
func noPlugins(t *testing.T) {
	t.Helper()
	t.Setenv(EnvPluginPath, t.TempDir())
}

func TestChoose(t *testing.T) {
	tests := []struct {
		name       string
		env        *string // nil: unset
		wantConfig string
		wantReason []string // substrings
	}{
		{"unset", nil, "go:ops_sequential", []string{"pure Go", "no PJRT plugin found"}},
		{"blank", ptr("  "), "go:ops_sequential", []string{"pure Go", "no PJRT plugin found"}},
		{"go", ptr("go"), "go:ops_sequential", []string{"GOMLX_BACKEND", `"go"`, "ops_sequential added", "deadlock"}},
		{"go colon", ptr("go:"), "go:ops_sequential", []string{"ops_sequential added"}},
		{"parallelism 4", ptr("go:parallelism=4"), "go:parallelism=4,ops_sequential", []string{"ops_sequential added"}},
		{"ops_parallel", ptr("go:ops_parallel"), "go:ops_parallel,ops_sequential", []string{"ops_sequential added"}},
		{"sequential then parallel", ptr("go:ops_sequential,ops_parallel"), "go:ops_sequential,ops_parallel,ops_sequential", []string{"added"}},
		{"ops_sequential", ptr("go:ops_sequential"), "go:ops_sequential", []string{"from GOMLX_BACKEND"}},
		{"parallelism 4 sequential", ptr("go:parallelism=4,ops_sequential"), "go:parallelism=4,ops_sequential", []string{"from GOMLX_BACKEND"}},
		{"parallelism 0", ptr("go:parallelism=0"), "go:parallelism=0", []string{"from GOMLX_BACKEND"}},
		{"unlimited parallelism", ptr("go:parallelism=-1"), "go:parallelism=-1", []string{"from GOMLX_BACKEND"}},
		{"parallelism 0 then 2", ptr("go:parallelism=0,parallelism=2"), "go:parallelism=0,parallelism=2,ops_sequential", []string{"added"}},
		{"xla honoured", ptr("xla:cpu"), "xla:cpu", []string{"from GOMLX_BACKEND"}},
		{"unknown passed through", ptr("nosuch"), "nosuch", []string{"from GOMLX_BACKEND"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			noPlugins(t)
			setOrUnset(t, EnvConfig, tc.env)
			config, reason := Choose()
			assert.Equal(t, tc.wantConfig, config)
			for _, s := range tc.wantReason {
				assert.Contains(t, reason, s)
			}
			assert.NotEqual(t, "go", config, "never GoMLX's default pure-Go configuration")
		})
	}
}

func TestChooseFakePlugin(t *testing.T) {
	if !slices.Contains(backends.List(), "xla") {
		t.Skip("XLA backend not compiled in (cgo off or -tags noxla)")
	}
	setOrUnset(t, EnvConfig, nil)

	dir := t.TempDir()
	cpu := filepath.Join(dir, "pjrt_c_api_cpu_plugin.so")
	require.NoError(t, os.WriteFile(cpu, []byte("not really a plugin"), 0o644))
	// Things that are not plugins are ignored.
	require.NoError(t, os.Mkdir(filepath.Join(dir, "pjrt_c_api_dir_plugin.so"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "libfoo.so"), nil, 0o644))
	t.Setenv(EnvPluginPath, "/nonexistent:"+dir)

	config, reason := Choose()
	assert.Equal(t, "xla:cpu", config)
	assert.Equal(t, "PJRT plugin "+cpu, reason)

	// cuda is preferred over cpu, whatever the directory order.
	dir2 := t.TempDir()
	cuda := filepath.Join(dir2, "pjrt_c_api_cuda_plugin.so")
	require.NoError(t, os.WriteFile(cuda, nil, 0o644))
	t.Setenv(EnvPluginPath, dir+":"+dir2)
	config, reason = Choose()
	assert.Equal(t, "xla:cuda", config)
	assert.Contains(t, reason, cuda)

	// The plan keeps the fallbacks: cuda, cpu, then pure Go.
	var configs []string
	for _, c := range plan() {
		configs = append(configs, c.config)
	}
	assert.Equal(t, []string{"xla:cuda", "xla:cpu", "go:ops_sequential"}, configs)

	// GOMLX_BACKEND wins over installed plugins.
	t.Setenv(EnvConfig, "go")
	config, _ = Choose()
	assert.Equal(t, "go:ops_sequential", config)
}

func TestLdSoConf(t *testing.T) {
	dir := t.TempDir()
	confD := filepath.Join(dir, "conf.d")
	require.NoError(t, os.Mkdir(confD, 0o755))
	main := filepath.Join(dir, "ld.so.conf")
	require.NoError(t, os.WriteFile(main, []byte("# comment\ninclude conf.d/*.conf\n/opt/a # trailing\n\ninclude "+main+"\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(confD, "x.conf"), []byte("/opt/b\n"), 0o644))
	dirs := ldSoConfDirs(nil, main, 0)
	// The self-include cycle terminates; /opt/b comes before /opt/a each round.
	require.NotEmpty(t, dirs)
	assert.Equal(t, []string{"/opt/b", "/opt/a"}, dirs[:2])
}

func TestGetUnknownBackend(t *testing.T) {
	resetForTest(t)
	t.Setenv(EnvConfig, "nosuch:opt")
	b, err := Get()
	require.Error(t, err)
	assert.Nil(t, b)
	assert.Contains(t, err.Error(), `"nosuch"`)
	assert.Contains(t, err.Error(), "unknown backend")
	assert.Equal(t, "", Description(), "nothing cached after a failure")

	// A bad option of a known backend is an error too, not a panic.
	t.Setenv(EnvConfig, "go:nosuchoption")
	_, err = Get()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "nosuchoption")
}

func TestGetSameInstanceAndRuns(t *testing.T) {
	resetForTest(t)
	noPlugins(t)
	setOrUnset(t, EnvConfig, nil)
	assert.Equal(t, "", Description())

	b1, err := Get()
	require.NoError(t, err)
	b2, err := Get()
	require.NoError(t, err)
	require.Same(t, b1, b2)
	assert.IsType(t, &simplego.Backend{}, b1)
	wantPrefix := "backend: go, ops in parallel (pure Go; no PJRT plugin found — install one to use XLA); matmuls: "
	if goexec.RaceDetector {
		wantPrefix = "backend: go:ops_sequential (pure Go; no PJRT plugin found — install one to use XLA); matmuls: "
	} else if strings.EqualFold(os.Getenv(goexec.EnvDisable), "off") {
		wantPrefix = "backend: go:ops_sequential (pure Go; no PJRT plugin found — install one to use XLA); matmuls: pure Go, " + goexec.ErrDisabled.Error()
	}
	assert.True(t, strings.HasPrefix(Description(), wantPrefix), Description())

	// The environment is read only once: later changes do not matter.
	t.Setenv(EnvConfig, "nosuch")
	b3, err := Get()
	require.NoError(t, err)
	require.Same(t, b1, b3)

	// Several independent matmuls in one graph: the kind of graph that can
	// deadlock GoMLX's default "go" configuration (this small one does not
	// reliably trigger it; it checks that the configuration computes;
	// goexec's TestParallelOpsDoNotDeadlock runs one that does trigger it).
	x := [][]float32{{1, 2}, {3, 4}}
	out := graph.MustExecOnce(b1, func(x *graph.Node) *graph.Node {
		sum := graph.MatMul(x, x)
		for i := 0; i < 8; i++ {
			sum = graph.Add(sum, graph.MatMul(graph.AddScalar(x, float64(i)), x))
		}
		return graph.ReduceAllSum(sum)
	}, x)
	// x·x = [[7,10],[15,22]] sums to 54; (x+i)·x sums to 54 + i·(sum of column sums of x = 4+6=10)·2 rows.
	want := float32(54)
	for i := 0; i < 8; i++ {
		want += 54 + float32(i)*20
	}
	assert.Equal(t, want, out.Value().(float32))
}

func TestCreateFallsBackToPureGo(t *testing.T) {
	// A plugin candidate that cannot be created falls back to pure Go and the
	// description says why. "nosuch:cpu" stands in for a broken plugin.
	b, desc, err := create([]candidate{
		{config: "nosuch:cpu", reason: "PJRT plugin /x/pjrt_c_api_cpu_plugin.so"},
		{config: SafeGoConfig, reason: "pure Go; no PJRT plugin found", pureGoFallback: true},
	})
	require.NoError(t, err)
	defer b.Finalize()
	assert.IsType(t, &simplego.Backend{}, b)
	assert.Contains(t, desc, "(pure Go; nosuch:cpu failed: unknown backend", desc)
}

func ptr(s string) *string { return &s }

func setOrUnset(t *testing.T, key string, v *string) {
	t.Helper()
	if v != nil {
		t.Setenv(key, *v)
		return
	}
	t.Setenv(key, "") // registers restoration
	require.NoError(t, os.Unsetenv(key))
}
