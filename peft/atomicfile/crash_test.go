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
	require.NoError(t, RecoverDir(dir))
	require.Equal(t, map[string]string{"x": "1"}, contents(t, dir))
	entries, err := os.ReadDir(parent)
	require.NoError(t, err)
	require.Len(t, entries, 1)

	// Killed after the new folder was complete, with the old one moved aside: the new one wins,
	// also under a name with glob characters.
	dir = filepath.Join(parent, "run[1]")
	require.NoError(t, WriteDir(dir, func(tmp string) error { return os.WriteFile(filepath.Join(tmp, "x"), []byte("old"), 0o644) }))
	require.NoError(t, os.Rename(dir, filepath.Join(parent, ".run[1].old-7")))
	require.NoError(t, os.Mkdir(filepath.Join(parent, ".run[1].tmp-8"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(parent, ".run[1].tmp-8", "x"), []byte("new"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(parent, ".run[1].tmp-8", completeMarker), nil, 0o644))
	require.NoError(t, RecoverDir(dir))
	require.Equal(t, map[string]string{"x": "new"}, contents(t, dir))
	entries, err = os.ReadDir(parent)
	require.NoError(t, err)
	require.Len(t, entries, 2, "no hidden copies left")

	dir = filepath.Join(parent, "checkpoint-5")
	err = WriteDir(dir, func(tmp string) error { return os.ErrInvalid })
	require.ErrorIs(t, err, os.ErrInvalid)
	require.Equal(t, map[string]string{"x": "1"}, contents(t, dir), "a failed fill changes nothing")
}

func TestWriteFilesRefusesPaths(t *testing.T) {
	for _, name := range []string{"../x", "a/b", ".hidden", ""} {
		require.ErrorContains(t, WriteFiles(t.TempDir(), []File{{Name: name}}), "not a plain file name")
	}
}

// A journal this package did not write (in a downloaded folder, say) is never obeyed: a loader's
// Complete and a writer's Finish leave the folder's files as they are, and the next save works.
func TestForeignJournal(t *testing.T) {
	for _, journalText := range []string{
		`{"remove": ["tokenizer.json", "model.safetensors"]}`,
		`{"files": [{"name": "config.json", "pending": "tokenizer.json"}]}`,
		`{"files": [{"name": "../x", "pending": ".x.pending-1"}]}`,
		`{"remove": [".."]}`,
		`not json`,
	} {
		dir := t.TempDir()
		for _, name := range []string{"tokenizer.json", "model.safetensors", "config.json"} {
			require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(name), 0o644))
		}
		require.NoError(t, os.WriteFile(filepath.Join(dir, journalName), []byte(journalText), 0o644))
		_ = Complete(dir)
		require.NoError(t, Finish(dir))
		require.Equal(t, map[string]string{"tokenizer.json": "tokenizer.json", "model.safetensors": "model.safetensors", "config.json": "config.json"}, contents(t, dir), journalText)
		require.NoError(t, WriteFiles(dir, []File{{Name: "config.json", Data: []byte("new")}}))
	}
	// Names to remove are checked before anything is committed.
	require.ErrorContains(t, WriteFiles(t.TempDir(), nil, ".."), "not a plain file name")
}

// A committed save whose file is neither pending nor in place is an error, not a silent loss.
func TestFinishReportsAMissingFile(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, journalName), []byte(`{"files": [{"name": "a.json", "pending": ".a.json.pending-1"}]}`), 0o644))
	require.ErrorContains(t, Finish(dir), "lists a.json, but neither it nor its pending file is there")
}
