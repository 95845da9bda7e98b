package atomicfile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// contents reads every visible file of dir.
func contents(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	out := map[string]string{}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		out[e.Name()] = string(data)
	}
	return out
}

// A WriteFiles stopped at each point where a kill could land leaves, once Finish has run (as
// every loader runs it), the old files or the new ones: never a mix.
func TestWriteFilesCrashPoints(t *testing.T) {
	old := map[string]string{"a.json": "old a", "b.bin": "old b", "stale": "old stale"}
	neu := map[string]string{"a.json": "new a", "b.bin": "new b"}
	for _, point := range []string{"before commit", "after commit", "after renaming a.json", "after renaming b.bin", ""} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			var files []File
			for _, name := range []string{"a.json", "b.bin", "stale"} {
				files = append(files, File{Name: name, Data: []byte(old[name])})
			}
			require.NoError(t, WriteFiles(dir, files))
			crashPoint = func(at string) {
				if at == point {
					panic("killed")
				}
			}
			defer func() { crashPoint = func(string) {} }()
			func() {
				defer func() { _ = recover() }()
				_ = WriteFiles(dir, []File{{Name: "a.json", Data: []byte("new a")}, {Name: "b.bin", Data: []byte("new b")}}, "stale")
			}()
			crashPoint = func(string) {}
			require.NoError(t, Finish(dir))
			got := contents(t, dir)
			if point == "before commit" {
				require.Equal(t, old, got)
			} else {
				require.Equal(t, neu, got)
			}
			// The next save removes what the stopped one left behind.
			require.NoError(t, WriteFiles(dir, []File{{Name: "a.json", Data: []byte("newer")}}))
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			for _, e := range entries {
				require.False(t, strings.HasPrefix(e.Name(), "."), "leftover %s", e.Name())
			}
		})
	}
}

// WriteDir stopped between moving the old folder aside and moving the new one in: the next
// WriteDir puts the old one back first, so the folder is never lost.
func TestWriteDirRecovers(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "checkpoint-5")
	require.NoError(t, WriteDir(dir, func(tmp string) error { return os.WriteFile(filepath.Join(tmp, "x"), []byte("1"), 0o644) }))
	require.NoError(t, os.Rename(dir, filepath.Join(parent, ".checkpoint-5.old-123")))
	require.NoError(t, os.Mkdir(filepath.Join(parent, ".checkpoint-5.tmp-456"), 0o755))
	require.NoError(t, recoverDir(parent, "checkpoint-5"))
	require.Equal(t, map[string]string{"x": "1"}, contents(t, dir))
	entries, err := os.ReadDir(parent)
	require.NoError(t, err)
	require.Len(t, entries, 1)

	err = WriteDir(dir, func(tmp string) error { return os.ErrInvalid })
	require.ErrorIs(t, err, os.ErrInvalid)
	require.Equal(t, map[string]string{"x": "1"}, contents(t, dir), "a failed fill changes nothing")
}

func TestWriteFilesRefusesPaths(t *testing.T) {
	for _, name := range []string{"../x", "a/b", ".hidden", ""} {
		require.ErrorContains(t, WriteFiles(t.TempDir(), []File{{Name: name}}), "not a plain file name")
	}
}
