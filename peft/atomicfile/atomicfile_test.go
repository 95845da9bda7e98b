package atomicfile_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/atomicfile"
)

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.json")
	for _, content := range []string{"first, longer content\n", "second\n", ""} {
		require.NoError(t, atomicfile.Write(path, []byte(content)))
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Equal(t, content, string(data), "the content is replaced, not appended or overlaid")
		entries, err := os.ReadDir(dir)
		require.NoError(t, err)
		require.Len(t, entries, 1, "no temporary file is left behind")
		require.Equal(t, "config.json", entries[0].Name())
		info, err := os.Stat(path)
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o644), info.Mode().Perm(), "readable like the state file safetensors.Write makes")
	}
	// A folder that does not exist: an error and nothing written.
	missing := filepath.Join(dir, "missing", "config.json")
	require.Error(t, atomicfile.Write(missing, []byte("x")))
	_, err := os.Stat(filepath.Dir(missing))
	require.True(t, os.IsNotExist(err))
	// A folder in the way of the file: the rename fails and the temporary file is removed.
	blocked := filepath.Join(dir, "blocked")
	require.NoError(t, os.MkdirAll(filepath.Join(blocked, "child"), 0o755))
	require.Error(t, atomicfile.Write(blocked, []byte("x")))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 2, "config.json and blocked/ only")
}
